"""moto's S3 server on loopback, for the storage contract and stage tests."""

from __future__ import annotations

BUCKET = "imagegen-test"


class MotoS3:
    """moto's S3 server on a free loopback port, with an admin client that sees the
    whole bucket (the store sees only its prefix)."""

    def __init__(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.admin = boto3.session.Session().client("s3", endpoint_url=self.endpoint)
        self.admin.create_bucket(Bucket=BUCKET)

    def empty(self) -> None:
        for page in self.admin.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for o in page.get("Contents", ()):
                self.admin.delete_object(Bucket=BUCKET, Key=o["Key"])
        for u in self.admin.list_multipart_uploads(Bucket=BUCKET).get("Uploads", ()):
            self.admin.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])

    def close(self) -> None:
        self.admin.close()
        self.server.stop()
