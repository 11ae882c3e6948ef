"""LitServe peer: POST /predict {"prompt", "seed"} -> an imagegen-shaped JSON body.

One inference worker and one API server process on the CPU, batches of up to 8 with
a 5 ms batch wait (the setting FACTS.md found best: a longer wait is paid by every
lone request). Run from the peers venv by serve/cli/bench_peers.py.
"""

from __future__ import annotations

import argparse

import litserve as ls
from peer_pipeline import Pipeline

MAX_BATCH = 8
BATCH_TIMEOUT_S = 0.005


class ImageAPI(ls.LitAPI):
    def setup(self, device) -> None:
        self.pipeline = Pipeline()

    def decode_request(self, request: dict) -> dict:
        return request

    def batch(self, inputs: list[dict]) -> list[dict]:
        return inputs

    def predict(self, bodies: list[dict]) -> list[dict]:
        # PNG encoding and base64 run here, in the worker, as imagegen's replica path
        # does them once per image.
        return self.pipeline.generate(bodies)

    def unbatch(self, outputs: list[dict]) -> list[dict]:
        return outputs

    def encode_response(self, output: dict) -> dict:
        return output


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    api = ImageAPI(max_batch_size=MAX_BATCH, batch_timeout=BATCH_TIMEOUT_S)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1,
                          timeout=120)
    server.run(host=args.host, port=args.port, num_api_servers=1, log_level="warning",
               generate_client_file=False)


if __name__ == "__main__":
    main()
