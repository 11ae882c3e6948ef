"""models.lock: every model revision the service may load, pinned by content.

The lock is TOML (`version = 1`) with one `[models.NAME]` table per revision.
A revision is never a floating tag: hub sources carry a 40-hex commit, and every
source lists each file with its sha256. The deployment name derives from the lock,
so a new revision is a new deployment.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError, ModelVerificationError, describe

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256")]
ModelName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,38}[a-z0-9]$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuiltinSource(_Frozen):
    """A tiny pipeline the project builds itself, deterministically."""

    kind: Literal["builtin"] = Field(description="built by `imagegen models build`")
    recipe: str = Field(description="recipe name in serve.tinymodels.RECIPES")
    seed: int = Field(ge=0, description="torch seed for the random weights")


class HubSource(_Frozen):
    """A hub repository at an immutable commit, fetched ahead of serving."""

    kind: Literal["hub"] = Field(description="fetched by `imagegen models fetch`")
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="owner/name on the hub")
    revision: str = Field(description="the 40-hex commit; never a branch or tag")

    @field_validator("revision")
    @classmethod
    def _commit(cls, v: str) -> str:
        if len(v) != 40 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError(f"revision {v!r} is not a 40-hex commit (branches and tags float)")
        return v


class PathSource(_Frozen):
    """A directory prepared out of band (a mounted volume, a synced bucket prefix)."""

    kind: Literal["path"] = Field(description="an existing local directory")
    path: str = Field(description="absolute, or relative to the model directory")


Source = Annotated[BuiltinSource | HubSource | PathSource, Field(discriminator="kind")]


class Defaults(_Frozen):
    width: int = Field(ge=8, le=4096, multiple_of=8, description="pixels")
    height: int = Field(ge=8, le=4096, multiple_of=8, description="pixels")
    steps: int = Field(ge=1, le=200, description="denoising steps")
    guidance: float = Field(ge=0, le=50, description="classifier-free guidance scale")


class Limits(_Frozen):
    min_size: int = Field(default=32, ge=8, multiple_of=8, description="smallest side, px")
    max_width: int = Field(ge=8, multiple_of=8, description="px")
    max_height: int = Field(ge=8, multiple_of=8, description="px")
    max_steps: int = Field(ge=1, le=500, description="most denoising steps a request may ask")
    max_guidance: float = Field(default=20.0, ge=0, description="largest guidance scale")
    max_images: int = Field(default=8, ge=1, le=64, description="most images per request")


class Profile(_Frozen):
    """One revision measured on one accelerator type by `imagegen capacity profile`."""

    measured: str = Field(description="date of the measurement (YYYY-MM-DD)")
    device: str = Field(description="what ran it, e.g. 'NVIDIA H200' or 'cpu x2'")
    width: int = Field(ge=8, description="px of the measured images")
    height: int = Field(ge=8, description="px of the measured images")
    steps: int = Field(ge=1, description="denoising steps of the measurement")
    attention: str = Field(description="sdpa or xformers")
    compiled: bool = Field(False, description="UNet under torch.compile")
    software: str = Field("", description="torch and diffusers versions")
    seconds_per_megapixel: dict[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0)]] = (
        Field(min_length=1, description="batch images -> seconds per megapixel per image")
    )
    peak_memory_gb: dict[Annotated[int, Field(ge=1)], Annotated[float, Field(ge=0)]] = Field(
        min_length=1, description="batch images -> peak accelerator memory of the replica"
    )


CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune",
                      "max-autotune-no-cudagraphs"]
Size = Annotated[str, Field(pattern=r"^[1-9][0-9]{1,3}x[1-9][0-9]{1,3}$",
                            description="WIDTHxHEIGHT in pixels, e.g. 1024x1024")]


class EngineOptions(_Frozen):
    """How the diffusers engine runs one revision: the GPU fast path, as data.

    Every default is the plain pipeline as it ran before these options existed, so
    an entry without an `engine` table loads exactly as before. Options change the
    output's floats (not the revision or the cache key): measure the PSNR against
    eager (`imagegen bench gpu`) before turning one on for a live revision.
    """

    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="compute dtype the weights are cast to at load; None: the entry's "
        "`dtype`. float16 and bfloat16 need CUDA: a CPU replica refuses to load (it stays "
        "unready and says why) rather than run half precision slowly on the CPU")
    attention: Literal["auto", "sdpa", "xformers"] = Field(
        "auto", description="auto: xformers on CUDA when it imports and passes diffusers' "
        "self-test, else PyTorch SDPA (the behaviour before this option); sdpa: always "
        "PyTorch SDPA; xformers: xformers or refuse to load (needs CUDA and the `gpu` extra)")
    compile: CompileMode = Field(
        "off", description="torch.compile mode for the UNet (and VAE decoder, see "
        "compile_vae); off: eager")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend; aot_eager and eager trace and guard "
        "like inductor but generate no kernels (tests, debugging a graph break)")
    inductor: dict[str, bool | int | float | str] = Field(
        default_factory=dict, description="torch._inductor.config settings applied at load "
        "with the inductor backend, e.g. {conv_1x1_as_mm = true}; an unknown name refuses "
        "to load (process-wide: one engine per replica)")
    compile_vae: bool = Field(
        True, description="with compile on, compile the VAE decoder too (same buckets)")
    bucket_sizes: list[Size] = Field(
        default_factory=list, description="sizes compiled at warm-up, crossed with "
        "bucket_batches; empty with compile on: every shape compiles on first use (a "
        "request can then meet a minute-long compile: for profiling, not serving)")
    bucket_batches: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        default_factory=lambda: [1], description="batch sizes (images per pipeline call) "
        "compiled per bucket size; a larger batch runs as several compiled bucket batches, "
        "and what no bucket fits runs eagerly (counted)")
    channels_last: bool = Field(
        False, description="UNet and VAE in channels_last memory format (faster convolutions "
        "on tensor cores)")
    fused_qkv: bool = Field(
        False, description="fuse the attention Q/K/V projections of the UNet and VAE into one "
        "matmul (diffusers' fuse_qkv_projections; SDPA only)")
    vae_tiling_min_pixels: Annotated[int, Field(ge=4096)] | None = Field(
        None, description="decode images of at least this many pixels (width x height) in "
        "tiles, eagerly, bounding the VAE's peak memory; None: never tile")

    @field_validator("bucket_sizes")
    @classmethod
    def _sizes(cls, v: list[str]) -> list[str]:
        for size in v:
            w, h = (int(x) for x in size.split("x"))
            if w % 8 or h % 8:
                raise ValueError(f"bucket size {size!r}: width and height must be multiples of 8")
        if len(set(v)) != len(v):
            raise ValueError(f"bucket_sizes {v!r} repeat a size")
        return v

    @field_validator("bucket_batches")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"bucket_batches {v!r} must be distinct and not empty")
        return sorted(v)

    @model_validator(mode="after")
    def _consistent(self) -> EngineOptions:
        if self.bucket_sizes and self.compile == "off":
            raise ValueError(f"bucket_sizes {self.bucket_sizes!r} need compile (it is 'off')")
        if self.fused_qkv and self.attention == "xformers":
            raise ValueError("fused_qkv installs SDPA's fused processor: it cannot be combined "
                             "with attention 'xformers'")
        if self.inductor and (self.compile == "off" or self.compile_backend != "inductor"):
            raise ValueError(f"inductor settings {sorted(self.inductor)} need compile with the "
                             "inductor backend")
        if self.compile_backend != "inductor" and self.compile not in ("off", "default"):
            raise ValueError(f"compile mode {self.compile!r} is an inductor mode; backend "
                             f"{self.compile_backend!r} takes compile 'default'")
        return self

    @property
    def buckets(self) -> list[tuple[int, int, int]]:
        """(width, height, batch) of every compiled bucket."""
        sizes = [tuple(int(x) for x in s.split("x")) for s in self.bucket_sizes]
        return [(w, h, b) for w, h in sizes for b in self.bucket_batches]

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> EngineOptions:
        """From an engine's options dict: the lock's `engine` table merged with
        Settings.engine_options. Runtime keys (threads) are not revision facts and are
        skipped; the older keys still work: `compile: true|false` and `xformers: false`
        (sdpa) / `true` (auto)."""
        raw = {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}
        if isinstance(raw.get("compile"), bool):
            raw["compile"] = "default" if raw["compile"] else "off"
        if "xformers" in raw:
            legacy = raw.pop("xformers")
            raw.setdefault("attention", "auto" if legacy else "sdpa")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(f"engine options: {describe(e)}") from None


# Engine options that describe the replica, not the revision (Settings, the policy).
RUNTIME_OPTIONS = frozenset({"threads"})


class ModelEntry(_Frozen):
    """One model revision. `name` is filled from the table key."""

    name: ModelName
    source: Source
    pipeline: str = Field(description="diffusers pipeline class, e.g. StableDiffusionPipeline")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(description="weights dtype")
    license: str = Field(min_length=1, description="SPDX id or licence name")
    commercial_use: Literal["allowed", "restricted", "forbidden"] = Field(
        description="whether images may ship in commercial products"
    )
    license_notes: str = Field(default="", description="terms a product team must know")
    vram_gb: float = Field(ge=0, description="accelerator memory estimate per replica")
    defaults: Defaults
    limits: Limits
    files: dict[str, Sha256] = Field(min_length=1, description="relative path -> sha256")
    profiles: dict[str, Profile] = Field(
        default_factory=dict, description="accelerator type -> measured speed and memory"
    )
    engine: EngineOptions = Field(
        default_factory=EngineOptions,
        description="how the engine runs this revision (dtype, attention, torch.compile "
        "buckets, ...); omitted: the plain pipeline",
    )

    def engine_options(self, *overrides: dict[str, Any]) -> dict[str, Any]:
        """What an engine of this revision gets: the lock's `engine` table, then each
        override (Settings.engine_options, threads) winning in turn. Replicas and every
        bench and profile run the same options, so a figure describes what is served."""
        out = self.engine.model_dump(exclude_defaults=True)
        for o in overrides:
            out.update(o)
        return out

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ModelEntry:
        d, lim = self.defaults, self.limits
        bad = [
            f"{field} {value} outside {lo}..{hi}"
            for field, value, lo, hi in (
                ("width", d.width, lim.min_size, lim.max_width),
                ("height", d.height, lim.min_size, lim.max_height),
                ("steps", d.steps, 1, lim.max_steps),
                ("guidance", d.guidance, 0, lim.max_guidance),
            )
            if not lo <= value <= hi
        ]
        if bad:
            raise ValueError(f"defaults must lie within limits: {'; '.join(bad)}")
        return self

    @property
    def revision(self) -> str:
        """The immutable revision: the hub commit, or the digest of the file list."""
        if isinstance(self.source, HubSource):
            return self.source.revision
        return files_digest(self.files)

    @property
    def deployment_name(self) -> str:
        """Serve deployment name: one per revision, derived from the lock."""
        return f"{self.name}-{self.revision[:10]}"

    def local_dir(self, model_dir: Path) -> Path:
        """Where this revision's files live once built or fetched."""
        if isinstance(self.source, PathSource):
            return model_dir / self.source.path  # an absolute path replaces model_dir
        return model_dir / self.name / self.revision[:16]


class Lock(_Frozen):
    version: Literal[1]
    models: dict[str, ModelEntry] = Field(min_length=1)

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"model {name!r} is not in models.lock") from None


def files_digest(files: dict[str, str]) -> str:
    """sha256 over sorted `path\\0sha256\\n` lines: a content revision for a file set."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(f"{path}\0{files[path]}\n".encode())
    return h.hexdigest()


def parse_lock(text: str, *, origin: str = "models.lock") -> Lock:
    """Parse and validate lock text; errors name the entry and field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{origin}: not valid TOML: {e}") from None
    models = raw.get("models")
    if models is not None and not isinstance(models, dict):
        raise ConfigError(f"{origin}: models must be a table of [models.NAME], got {models!r}")
    for name, entry in (models or {}).items():
        if isinstance(entry, dict) and entry.setdefault("name", name) != name:
            raise ConfigError(
                f"{origin}: models.{name}.name is {entry['name']!r}; the key is the name"
            )
    try:
        return Lock.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{origin}: {describe(e)}") from None


def load_lock(path: Path) -> Lock:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    return parse_lock(text, origin=str(path))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_files(root: Path) -> list[str]:
    """Relative paths of every non-hidden file under root, sorted."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def hash_tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 for every non-hidden file under root."""
    return {rel: sha256_file(root / rel) for rel in tree_files(root)}


def verify(entry: ModelEntry, root: Path) -> None:
    """Check every file against the lock. Raises naming the first bad file.

    Unlisted files fail too: `from_pretrained` could load them unverified.
    """
    if not root.is_dir():
        raise ModelVerificationError(
            f"{entry.name}: model directory {root} does not exist "
            "(run `imagegen models build` or `imagegen models fetch`)"
        )
    for rel, want in sorted(entry.files.items()):
        path = root / rel
        if not path.is_file():
            raise ModelVerificationError(f"{entry.name}: missing file {rel}")
        got = sha256_file(path)
        if got != want:
            raise ModelVerificationError(
                f"{entry.name}: sha256 mismatch for {rel}: lock {want[:12]}…, file {got[:12]}…"
            )
    extra = sorted(set(tree_files(root)) - set(entry.files))
    if extra:
        raise ModelVerificationError(f"{entry.name}: files not in models.lock: {', '.join(extra)}")
