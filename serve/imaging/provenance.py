"""Content credentials: a signed C2PA manifest in each delivered image saying it was
made by a trained model (EU AI Act Art. 50(2)), through c2pa-python (c2pa-rs inside).

The manifest holds one `c2pa.actions` assertion, `c2pa.created` with IPTC's
`trainedAlgorithmicMedia`, and the claim generator `imagegen` version `1` (C2PA 2.x
claims, which c2pa-rs writes, spell "imagegen/1" as `claim_generator_info`; the old
`claim_generator` string is dropped). Never a prompt, seed or user: the only free
text is an optional title the caller chooses.

Imported where a plan needs it (it loads c2pa-rs, a 23 MB native library), like
`serve.imaging.watermark`. Signing needs no network unless a TSA URL is configured.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any, Self

import c2pa
import numpy as np
from PIL import Image

from .encode import CREATOR_TOOL, DIGITAL_SOURCE_TYPE

CLAIM_GENERATOR = {"name": CREATOR_TOOL, "version": "1"}
ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")
# What the encoder makes; each is in c2pa-rs 0.91's list (`supports` asks the library).
IMAGE_MIMES = ("image/png", "image/jpeg", "image/webp", "image/avif")
MAX_TITLE_CHARS = 256

_SIGN_SETTINGS = {
    # A thumbnail of a generated image repeats the image, and c2pa-rs's default JPEG
    # one added 0.5-2.4 MB to a 512x512 image of uniform noise (the worst case) and
    # ~85 ms of its ~88 ms signing time.
    "builder": {"thumbnail": {"enabled": False}},
    # Re-validating each signed asset costs ~0.6 ms and is what catches a key that
    # does not match its certificate, or a certificate c2pa-rs's profile rejects.
    "verify": {"verify_after_sign": True, "remote_manifest_fetch": False,
               "ocsp_fetch": False},
}
# Reading an untrusted upload must never reach the network: a manifest can point at
# a remote store, and a certificate at an OCSP responder.
_READ_SETTINGS = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}


@functools.cache
def _library_mimes() -> frozenset[str]:
    return frozenset(c2pa.Builder.get_supported_mime_types())


class C2paSigner:
    """Embeds a signed C2PA manifest in encoded image bytes.

    `cert_chain` is a PEM file of the signing certificate and its intermediates, leaf
    first (the root may be left out); `private_key` the leaf's PEM (PKCS#8) key. c2pa-rs
    wants a CA-issued leaf with digitalSignature key usage and an extended key usage it
    accepts: emailProtection (documentSigning and C2PA's claimSigning fail its check
    unless a trust config lists them). A self-signed leaf validates but is never
    "Trusted". `tsa_url` adds an RFC 3161 timestamp from that authority to each
    signature (a network call per image); without one the signature is valid only
    while the certificate is.

    Construction signs a 1x1 probe, so bad credentials fail here with ValueError, not on
    the first request. One instance may be shared by threads: each `sign` builds its
    own single-use Builder over one shared c2pa Context. Build it in the process that
    signs: in a forked child the parent's copy fails ("Context is not valid").
    """

    def __init__(self, cert_chain: str | Path, private_key: str | Path, *,
                 alg: str = "es256", tsa_url: str | None = None) -> None:
        if alg not in ALGORITHMS:
            raise ValueError(f"C2PA signing algorithm {alg!r} is not one of "
                             f"{', '.join(ALGORITHMS)}")
        if tsa_url is not None and not tsa_url.startswith(("http://", "https://")):
            raise ValueError(f"C2PA TSA URL {tsa_url!r} is not an http(s) URL")
        certs = _read_pem(cert_chain, "certificate chain", "-----BEGIN CERTIFICATE-----")
        key = _read_pem(private_key, "private key", "PRIVATE KEY-----")
        info = c2pa.C2paSignerInfo(alg.encode(), certs, key,
                                   None if tsa_url is None else tsa_url.encode())
        try:
            signer = c2pa.Signer.from_info(info)
        except c2pa.C2paError as e:
            raise ValueError(f"C2PA private key {str(private_key)!r} is not a usable {alg} "
                             f"key: {e}") from None
        # The Context consumes the Signer: only the Context is ours to close.
        self._context = c2pa.Context(settings=c2pa.Settings.from_dict(_SIGN_SETTINGS),
                                     signer=signer)
        self.alg = alg
        self._definition: dict[str, Any] = {
            "claim_generator_info": [CLAIM_GENERATOR],
            "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE}]}}],
        }
        try:
            self.sign(_probe_png(), "image/png")
        except RuntimeError as e:
            self.close()
            raise ValueError(f"C2PA credentials {str(cert_chain)!r} and "
                             f"{str(private_key)!r} cannot sign: {e.__cause__}") from None

    @staticmethod
    def supports(mime: str) -> bool:
        """Whether `sign` embeds a manifest in `mime` (png, jpeg, webp, avif with
        c2pa-python 0.38); `sign` returns other formats unchanged."""
        return mime in IMAGE_MIMES and mime in _library_mimes()

    def sign(self, data: bytes, mime: str, *, title: str | None = None) -> bytes:
        """`data` (encoded as `mime`) with a signed manifest embedded, or `data` itself
        where `supports(mime)` is False. `title` is the manifest's dc:title: a file
        name, never a prompt. Raises RuntimeError if c2pa-rs cannot sign the bytes."""
        if not self.supports(mime):
            return data
        definition = self._definition
        if title is not None:
            if not isinstance(title, str) or not 0 < len(title) <= MAX_TITLE_CHARS:
                raise ValueError(f"C2PA title {title!r} is not a string of 1 to "
                                 f"{MAX_TITLE_CHARS} characters")
            definition = {**definition, "title": title}
        out = io.BytesIO()
        try:
            c2pa.Builder(definition, context=self._context).sign(mime, io.BytesIO(data), out)
        except c2pa.C2paError as e:
            raise RuntimeError(f"C2PA signing of {len(data)} bytes of {mime} failed: "
                               f"{e}") from e
        return out.getvalue()

    def close(self) -> None:
        """Free the native signer; `sign` fails afterwards."""
        self._context.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(data: bytes, mime: str, *,
                  trust_anchors: str | None = None) -> dict[str, Any] | None:
    """The active C2PA manifest in `data` as a dict, None if it carries none. The
    store's verdict is added under `validation_state` ("Invalid", "Valid", or "Trusted"
    when the signer chains to a root in the PEM `trust_anchors`) and
    `validation_results` (c2pa-rs's success/informational/failure codes). Offline:
    remote manifests and OCSP are never fetched. ValueError if the store is unreadable."""
    settings = _READ_SETTINGS
    if trust_anchors is not None:
        settings = {**settings, "trust": {"trust_anchors": trust_anchors}}
    with c2pa.Context(settings=c2pa.Settings.from_dict(settings)) as context:
        try:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
        except c2pa.C2paError as e:
            raise ValueError(f"C2PA manifest store in {len(data)} bytes of {mime} is "
                             f"unreadable: {e}") from None
        if reader is None:
            return None
        with reader:
            store = json.loads(reader.json())
    manifest = store.get("manifests", {}).get(store.get("active_manifest"))
    if manifest is None:
        return None
    return {**manifest, "validation_state": store.get("validation_state"),
            "validation_results": store.get("validation_results", {})}


def _read_pem(path: str | Path, what: str, marker: str) -> bytes:
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"C2PA {what} {str(path)!r} is unreadable: {e.strerror}") from None
    if marker.encode() not in text:
        raise ValueError(f"C2PA {what} {str(path)!r} holds no PEM block ({marker})")
    return text


@functools.cache
def _probe_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
