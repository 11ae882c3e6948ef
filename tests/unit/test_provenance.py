"""serve.imaging.provenance: C2PA content credentials. A test CA issues the signing
certificate at test time; each format the encoder makes comes back with a manifest
that validates, says `c2pa.created` by a trained model, and holds no prompt; changed
pixels fail validation; bad credentials fail at construction with a clear message."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("c2pa")

from c2pa_certs import Credentials, issue
from cryptography.x509.oid import ExtendedKeyUsageOID
from PIL import Image

from serve.imaging import MIME, encode, read_xmp
from serve.imaging.encode import DIGITAL_SOURCE_TYPE, FORMATS
from serve.imaging.provenance import C2paSigner, read_manifest

PROMPT = "a portrait of Jane Doe outside 12 Elm Street, Springfield"


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> Credentials:
    return issue(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def signer(creds):
    with C2paSigner(creds.chain, creds.key) as s:
        yield s


def picture(w: int = 96, h: int = 64, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([40 + 180 * y / h, 60 + 150 * x / w, 120 + 0 * x], axis=-1)
    grain = np.random.default_rng(seed).normal(0, 6, (h, w, 3))
    return np.clip(base + grain, 0, 255).astype(np.uint8)


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def failure_codes(manifest: dict) -> list[str]:
    return [f["code"] for f in manifest["validation_results"]["activeManifest"]["failure"]]


# ---- the manifest -----------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_signed_image_says_created_by_a_trained_model(signer, creds, fmt):
    unsigned = encode(picture(), fmt)
    signed = signer.sign(unsigned, MIME[fmt], title=f"image-0.{fmt}")
    assert signed != unsigned and C2paSigner.supports(MIME[fmt])

    m = read_manifest(signed, MIME[fmt])
    # Valid, not Trusted: no trust anchors given, so the one failure is the trust.
    assert m is not None and m["validation_state"] == "Valid"
    assert failure_codes(m) == ["signingCredential.untrusted"]
    [actions] = [a for a in m["assertions"] if a["label"].startswith("c2pa.actions")]
    assert actions["data"]["actions"] == [
        {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE}]
    assert DIGITAL_SOURCE_TYPE.endswith("/trainedAlgorithmicMedia")
    assert [{k: g[k] for k in ("name", "version")} for g in m["claim_generator_info"]] == [
        {"name": "imagegen", "version": "1"}]
    assert m["title"] == f"image-0.{fmt}"
    assert "thumbnail" not in m  # disabled: it would repeat the image

    # Signing adds a container box or segment; the pixels are not re-encoded.
    assert np.array_equal(pixels(signed), pixels(unsigned))
    assert pixels(signed).shape == (64, 96, 3)
    trusted = read_manifest(signed, MIME[fmt], trust_anchors=creds.root_pem)
    assert trusted["validation_state"] == "Trusted" and failure_codes(trusted) == []


def test_the_encoders_xmp_marking_survives_signing(signer):
    for fmt in ("png", "jpeg"):
        signed = signer.sign(encode(picture(), fmt), MIME[fmt])
        assert DIGITAL_SOURCE_TYPE in (read_xmp(signed) or ""), fmt


def test_no_prompt_reaches_the_manifest(signer):
    # The signer takes no prompt at all; what it writes is a constant definition, an
    # optional title, and what c2pa-rs adds (ids, hashes, the signature).
    unsigned = encode(picture(), "png")
    signed = signer.sign(unsigned, "image/png")
    m = read_manifest(signed, "image/png")
    assert PROMPT.encode() not in signed and PROMPT not in json.dumps(m)
    assert {a["label"] for a in m["assertions"]} == {"c2pa.actions.v2"}
    assert "title" not in m
    assert set(m) <= {"claim_generator_info", "instance_id", "assertions", "signature_info",
                      "label", "claim_version", "validation_state", "validation_results"}


def test_every_algorithm_family_signs(tmp_path):
    for kind, alg in [("p256", "es256"), ("p384", "es384"), ("rsa", "ps256"),
                      ("ed25519", "ed25519")]:
        c = issue(tmp_path / kind, kind=kind)
        with C2paSigner(c.chain, c.key, alg=alg) as s:
            m = read_manifest(s.sign(encode(picture(), "jpeg"), "image/jpeg"), "image/jpeg")
        assert m["validation_state"] == "Valid", alg
        assert m["signature_info"]["alg"].lower() == alg


# ---- tampering --------------------------------------------------------------------

def _png_chunk(data: bytes, kind: bytes) -> tuple[int, int]:
    """(offset, total length) of the first `kind` chunk."""
    pos = 8
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == kind:
            return pos, 12 + n
        pos += 12 + n
    raise AssertionError(f"no {kind!r} chunk")


def test_changed_png_pixels_fail_validation(signer):
    image = picture()
    signed = signer.sign(encode(image, "png"), "image/png")
    # Swap in the IDAT of one changed pixel: a well-formed PNG (CRC and all) whose
    # manifest chunk is untouched.
    changed = image.copy()
    changed[10, 10] ^= 0x80
    other = encode(changed, "png", provenance=False)
    (sp, sn), (op, on) = _png_chunk(signed, b"IDAT"), _png_chunk(other, b"IDAT")
    tampered = signed[:sp] + other[op:op + on] + signed[sp + sn:]
    assert np.array_equal(pixels(tampered), changed)

    m = read_manifest(tampered, "image/png")
    assert m["validation_state"] == "Invalid"
    assert "assertion.dataHash.mismatch" in failure_codes(m)


def test_changed_jpeg_pixels_fail_validation(signer):
    signed = signer.sign(encode(picture(), "jpeg"), "image/jpeg")
    i = len(signed) - 64  # inside the entropy-coded scan, before the EOI marker
    while signed[i] == 0xFF or signed[i] ^ 1 == 0xFF:
        i -= 1
    tampered = signed[:i] + bytes([signed[i] ^ 1]) + signed[i + 1:]
    assert not np.array_equal(pixels(tampered), pixels(signed))

    m = read_manifest(tampered, "image/jpeg")
    assert m["validation_state"] == "Invalid"
    assert "assertion.dataHash.mismatch" in failure_codes(m)


# ---- formats, titles, lifecycle ---------------------------------------------------

def test_unsupported_format_comes_back_unchanged(signer):
    gif = io.BytesIO()
    Image.fromarray(picture()).save(gif, format="GIF")
    assert not C2paSigner.supports("image/gif") and not signer.supports("image/bmp")
    assert signer.sign(gif.getvalue(), "image/gif") == gif.getvalue()


def test_an_unsigned_image_has_no_manifest():
    assert read_manifest(encode(picture(), "png"), "image/png") is None


def test_bytes_that_are_not_the_format_are_refused(signer):
    with pytest.raises(RuntimeError, match="asset could not be parsed"):
        signer.sign(b"not a png", "image/png")
    with pytest.raises(ValueError, match="unreadable"):
        read_manifest(b"not a png", "image/png")


def test_signing_again_replaces_the_manifest(signer):
    once = signer.sign(encode(picture(), "png"), "image/png", title="first")
    twice = signer.sign(once, "image/png", title="second")
    m = read_manifest(twice, "image/png")
    assert m["title"] == "second" and m["validation_state"] == "Valid"
    assert abs(len(twice) - len(once)) < 64  # one store, not two


@pytest.mark.parametrize("title", ["", "x" * 257, 7])
def test_bad_title_is_refused(signer, title):
    with pytest.raises(ValueError, match="title"):
        signer.sign(encode(picture(), "png"), "image/png", title=title)


def test_threads_share_one_signer(signer):
    data, results, errors = encode(picture(), "jpeg"), [], []

    def work():
        try:
            results.extend(signer.sign(data, "image/jpeg") for _ in range(5))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 40
    manifests = [read_manifest(r, "image/jpeg") for r in results]
    assert {m["validation_state"] for m in manifests} == {"Valid"}
    assert len({m["instance_id"] for m in manifests}) == 40


def test_a_closed_signer_refuses_to_sign(creds):
    s = C2paSigner(creds.chain, creds.key)
    s.close()
    with pytest.raises(RuntimeError, match="C2PA signing"):
        s.sign(encode(picture(), "png"), "image/png")


# ---- bad credentials --------------------------------------------------------------

def _garbage_key(c: Credentials, folder: Path) -> dict:
    (folder / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                    "-----END PRIVATE KEY-----\n")
    return {"cert_chain": c.chain, "private_key": folder / "bad.pem"}


def _cert_not_pem(c: Credentials, folder: Path) -> dict:
    (folder / "chain.der").write_bytes(b"\x30\x82\x01\x00")
    return {"cert_chain": folder / "chain.der", "private_key": c.key}


def _missing_key(c: Credentials, folder: Path) -> dict:
    return {"cert_chain": c.chain, "private_key": folder / "absent.pem"}


def _someone_elses_key(c: Credentials, folder: Path) -> dict:
    return {"cert_chain": c.chain, "private_key": issue(folder / "other").key}


def _rsa_key_as_es256(c: Credentials, folder: Path) -> dict:
    r = issue(folder / "rsa", kind="rsa")
    return {"cert_chain": r.chain, "private_key": r.key, "alg": "es256"}


def _root_first(c: Credentials, folder: Path) -> dict:
    leaf, root = c.chain.read_text().split("-----END CERTIFICATE-----\n", 1)[0], c.root_pem
    (folder / "root-first.pem").write_text(root + leaf + "-----END CERTIFICATE-----\n")
    return {"cert_chain": folder / "root-first.pem", "private_key": c.key}


def _server_auth_eku(c: Credentials, folder: Path) -> dict:
    s = issue(folder / "tls", eku=ExtendedKeyUsageOID.SERVER_AUTH)
    return {"cert_chain": s.chain, "private_key": s.key}


def _no_digital_signature(c: Credentials, folder: Path) -> dict:
    s = issue(folder / "nods", signing=False)
    return {"cert_chain": s.chain, "private_key": s.key}


def _unknown_alg(c: Credentials, folder: Path) -> dict:
    return {"cert_chain": c.chain, "private_key": c.key, "alg": "hs256"}


def _tsa_not_a_url(c: Credentials, folder: Path) -> dict:
    return {"cert_chain": c.chain, "private_key": c.key, "tsa_url": "tsa.example"}


@pytest.mark.parametrize("make, message", [
    (_garbage_key, r"private key .* is not a usable es256 key: .*PKCS#8"),
    (_cert_not_pem, r"certificate chain .* holds no PEM block"),
    (_missing_key, r"private key .* is unreadable: No such file"),
    (_someone_elses_key, r"cannot sign: .*signature does not match"),
    (_rsa_key_as_es256, r"not a usable es256 key"),
    (_root_first, r"cannot sign: .*self-signed"),  # the chain is leaf first
    (_server_auth_eku, r"cannot sign: .*certificate is invalid"),
    (_no_digital_signature, r"cannot sign: .*certificate is invalid"),
    (_unknown_alg, r"algorithm 'hs256' is not one of es256"),
    (_tsa_not_a_url, r"TSA URL 'tsa.example'"),
])
def test_bad_credentials_fail_at_construction(creds, tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        C2paSigner(**make(creds, tmp_path))

