"""Stage 10, post-processing: encode (PNG, WebP, AVIF, JPEG, with provenance XMP and
no other metadata), aspect-ratio sizes, the safety blur. The watermark lives in
`serve.imaging.watermark`, imported where a plan needs it (it pulls in cv2)."""

from .encode import EXTENSION, MIME, encode, encode_png, read_xmp
from .redact import blur
from .sizes import sizes_for

__all__ = ["EXTENSION", "MIME", "blur", "encode", "encode_png", "read_xmp", "sizes_for"]
