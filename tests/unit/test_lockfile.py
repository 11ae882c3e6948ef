"""models.lock: parse, validate, revisions, deployment names, verify."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from serve.errors import ConfigError, ModelVerificationError
from serve.lockfile import HubSource, PathSource, files_digest, parse_lock, verify

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_valid_lock_parses_and_fills_names(lock_text):
    lock = parse_lock(lock_text())
    assert set(lock.models) == {"tiny-draft", "tiny-final"}
    for key, entry in lock.models.items():
        assert entry.name == key
    draft = lock.get("tiny-draft")
    assert isinstance(draft.source, PathSource)
    assert isinstance(lock.get("tiny-final").source, HubSource)
    assert (draft.defaults.width, draft.defaults.height, draft.defaults.steps) == (64, 48, 4)
    assert draft.limits.max_images == 4
    assert draft.license_notes == ""  # optional field defaults


def test_limits_defaults_apply_when_omitted(lock_text):
    lock = parse_lock(lock_text({"tiny-draft": {
        "limits": {"max_width": 256, "max_height": 256, "max_steps": 50}}}))
    lim = lock.get("tiny-draft").limits
    assert (lim.min_size, lim.max_guidance, lim.max_images) == (32, 20.0, 8)


def test_get_unknown_model_is_config_error(lock_text):
    with pytest.raises(ConfigError, match="'nope'"):
        parse_lock(lock_text()).get("nope")


HUB = {"kind": "hub", "repo": "acme/m"}

# (patch for tiny-draft, substrings the ConfigError message must contain)
REJECTED = [
    pytest.param({"source": {**HUB, "revision": "main"}}, ["revision", "'main'"], id="branch"),
    pytest.param({"source": {**HUB, "revision": "v1.0"}}, ["revision", "'v1.0'"], id="tag"),
    pytest.param({"source": {**HUB, "revision": COMMIT[:39]}}, ["revision", COMMIT[:39]],
                 id="39-hex"),
    pytest.param({"source": {**HUB, "revision": COMMIT.upper()}}, ["revision", COMMIT.upper()],
                 id="upper-hex"),
    pytest.param({"source": {**HUB, "revision": "g" * 40}}, ["revision", "g" * 40],
                 id="non-hex"),
    pytest.param({"source": {"kind": "hub", "repo": "no-owner", "revision": COMMIT}},
                 ["repo", "'no-owner'"], id="repo-without-owner"),
    pytest.param({"source": {"kind": "ftp", "path": "x"}}, ["source", "ftp"], id="source-kind"),
    pytest.param({"files": {"model_index.json": "abc123"}}, ["model_index.json", "'abc123'"],
                 id="short-sha"),
    pytest.param({"files": {"model_index.json": "A" * 64}}, ["model_index.json", "A" * 64],
                 id="upper-sha"),
    pytest.param({"files": {}}, ["files"], id="no-files"),
    pytest.param({"colour": "blue"}, ["colour", "'blue'"], id="unknown-field"),
    pytest.param({"source": {"kind": "path", "path": "x", "mirror": "y"}}, ["mirror", "'y'"],
                 id="unknown-source-field"),
    pytest.param({"dtype": "float64"}, ["dtype", "'float64'"], id="dtype"),
    pytest.param({"commercial_use": "maybe"}, ["commercial_use", "'maybe'"], id="commercial"),
    pytest.param({"license": ""}, ["license", "''"], id="empty-license"),
    pytest.param({"vram_gb": -1}, ["vram_gb", "-1"], id="negative-vram"),
    pytest.param({"defaults": {"width": 60, "height": 48, "steps": 4, "guidance": 7.5}},
                 ["defaults.width", "60"], id="default-width-not-multiple-of-8"),
    pytest.param({"limits": {"max_width": 256, "max_height": 256, "max_steps": 0}},
                 ["limits.max_steps", "0"], id="max-steps-0"),
]


@pytest.mark.parametrize(("patch", "needles"), REJECTED)
def test_rejects_bad_entry_naming_field_and_value(lock_text, patch, needles):
    with pytest.raises(ConfigError) as info:
        parse_lock(lock_text({"tiny-draft": patch}), origin="test.lock")
    msg = str(info.value)
    assert msg.startswith("test.lock: ")
    assert "tiny-draft" in msg
    for needle in needles:
        assert needle in msg


@pytest.mark.parametrize("key", ["Tiny", "a", "under_score", "-x", "x-", "a" * 41])
def test_rejects_bad_model_name(toml_lock, entry_dicts, key):
    with pytest.raises(ConfigError) as info:
        parse_lock(toml_lock({key: entry_dicts()["tiny-draft"]}))
    assert f"models.{key}.name" in str(info.value)
    assert repr(key) in str(info.value)


def test_name_field_cannot_disagree_with_key(toml_lock, entry_dicts):
    table = {**entry_dicts()["tiny-draft"], "name": "other"}
    try:
        lock = parse_lock(toml_lock({"tiny-draft": table}))
    except ConfigError:
        return  # rejecting it is fine too
    assert lock.get("tiny-draft").name == "tiny-draft"


@pytest.mark.parametrize(
    "limits_patch",
    [
        pytest.param({"max_width": 32}, id="default-width-over-max"),
        pytest.param({"max_steps": 2}, id="default-steps-over-max"),
        pytest.param({"max_guidance": 5.0}, id="default-guidance-over-max"),
        pytest.param({"min_size": 56}, id="default-height-under-min"),
    ],
)
def test_defaults_must_lie_within_limits(lock_text, entry_dicts, limits_patch):
    limits = {**entry_dicts()["tiny-draft"]["limits"], **limits_patch}
    with pytest.raises(ConfigError, match="tiny-draft"):
        parse_lock(lock_text({"tiny-draft": {"limits": limits}}))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param(None, "version", id="missing-version"),
        pytest.param(2, "version", id="version-2"),
        pytest.param("1", "version", id="version-string"),
    ],
)
def test_rejects_bad_version(lock_text, text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_lock(lock_text(version=text))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param("version = 1\n[models\n", "not valid TOML", id="broken-toml"),
        pytest.param('version = 1\nversion = 2\n', "not valid TOML", id="duplicate-key"),
        pytest.param("version = 1\n", "models", id="no-models"),
        pytest.param("version = 1\nmodels = {}\n", "models", id="empty-models"),
        pytest.param('version = 1\nmodels = "x"\n', "models", id="models-not-table"),
        pytest.param("version = 1\nmodels = [1]\n", "models", id="models-array"),
        pytest.param('version = 1\n[models]\nm1 = 3\n', "models.m1", id="entry-not-table"),
    ],
)
def test_rejects_bad_documents(text, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        parse_lock(text, origin="x.lock")
    assert str(info.value).startswith("x.lock: ")


# --- revisions and deployment names -------------------------------------------------


def test_hub_revision_is_the_commit(lock_text):
    entry = parse_lock(lock_text()).get("tiny-final")
    assert entry.revision == "0123456789abcdef0123456789abcdef01234567"
    assert entry.deployment_name == "tiny-final-0123456789"


def test_path_revision_is_files_digest(lock_text):
    entry = parse_lock(lock_text()).get("tiny-draft")
    # Recomputed independently from the documented formula.
    h = hashlib.sha256()
    for path in sorted(entry.files):
        h.update(f"{path}\0{entry.files[path]}\n".encode())
    assert entry.revision == files_digest(dict(entry.files)) == h.hexdigest()
    assert entry.deployment_name == f"tiny-draft-{h.hexdigest()[:10]}"


def test_builtin_revision_is_files_digest(lock_text):
    src = {"kind": "builtin", "recipe": "tiny-sd", "seed": 0}
    entry = parse_lock(lock_text({"tiny-draft": {"source": src}})).get("tiny-draft")
    assert entry.revision == files_digest(dict(entry.files))


FILES = {"model_index.json": "a" * 64, "unet/w.safetensors": "b" * 64}


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({**FILES, "model_index.json": "c" * 64}, id="one-hash"),
        pytest.param({**FILES, "unet/w.safetensors": "c" * 64}, id="other-hash"),
        pytest.param({**FILES, "vae/w.safetensors": "c" * 64}, id="added-file"),
        pytest.param({"model_index.json": "a" * 64}, id="removed-file"),
        pytest.param({"model_index.json": "a" * 64, "unet/x.safetensors": "b" * 64},
                     id="renamed-file"),
        pytest.param({"model_index.json": "b" * 64, "unet/w.safetensors": "a" * 64},
                     id="swapped-hashes"),
    ],
)
def test_revision_and_deployment_name_change_with_files(lock_text, changed):
    before = parse_lock(lock_text({"tiny-draft": {"files": FILES}})).get("tiny-draft")
    after = parse_lock(lock_text({"tiny-draft": {"files": changed}})).get("tiny-draft")
    assert before.revision != after.revision
    assert before.deployment_name != after.deployment_name


def test_revision_ignores_file_order(lock_text):
    a = parse_lock(lock_text({"tiny-draft": {"files": FILES}})).get("tiny-draft")
    b = parse_lock(lock_text({"tiny-draft": {"files": dict(reversed(FILES.items()))}}))
    assert a.revision == b.get("tiny-draft").revision


def test_hub_deployment_name_differs_across_commits(lock_text):
    names = set()
    for commit in ("1" * 40, "2" * 40):
        src = {"kind": "hub", "repo": "acme/tiny-final", "revision": commit}
        entry = parse_lock(lock_text({"tiny-final": {"source": src}})).get("tiny-final")
        assert entry.deployment_name == f"tiny-final-{commit[:10]}"
        names.add(entry.deployment_name)
    assert len(names) == 2


# --- verify ---------------------------------------------------------------------------

CONTENT = {"model_index.json": b'{"_class_name": "X"}', "unet/w.safetensors": b"\x00\x01weights"}


@pytest.fixture
def model(tmp_path, lock_text):
    """A model directory whose files match its lock entry."""
    root = tmp_path / "m"
    for rel, data in CONTENT.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    files = {rel: hashlib.sha256(data).hexdigest() for rel, data in CONTENT.items()}
    entry = parse_lock(lock_text({"tiny-draft": {"files": files}})).get("tiny-draft")
    return entry, root


def test_verify_passes_on_matching_files(model):
    verify(*model)


def test_verify_ignores_hidden_files(model):
    entry, root = model
    (root / ".cache").mkdir()
    (root / ".cache" / "x").write_bytes(b"hub cache")
    (root / "unet" / ".lock").write_bytes(b"")
    (root / ".gitattributes").write_bytes(b"*")
    verify(entry, root)


def _tamper(root: Path) -> None:
    (root / "unet/w.safetensors").write_bytes(b"other weights")


def _remove(root: Path) -> None:
    (root / "unet/w.safetensors").unlink()


def _extra(root: Path) -> None:
    (root / "vae").mkdir()
    (root / "vae" / "evil.bin").write_bytes(b"unverified")


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        pytest.param(_tamper, ["sha256 mismatch", "unet/w.safetensors"], id="sha-mismatch"),
        pytest.param(_remove, ["missing file", "unet/w.safetensors"], id="missing-file"),
        pytest.param(_extra, ["not in models.lock", "vae/evil.bin"], id="extra-file"),
    ],
)
def test_verify_rejects_damaged_tree(model, damage, needles):
    entry, root = model
    damage(root)
    with pytest.raises(ModelVerificationError) as info:
        verify(entry, root)
    assert str(info.value).startswith("tiny-draft: ")
    for needle in needles:
        assert needle in str(info.value)


def test_verify_rejects_missing_directory(model, tmp_path):
    entry, _ = model
    with pytest.raises(ModelVerificationError, match="does not exist") as info:
        verify(entry, tmp_path / "absent")
    assert str(tmp_path / "absent") in str(info.value)


def test_verify_rejects_a_file_where_the_directory_should_be(model, tmp_path):
    entry, _ = model
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ModelVerificationError):
        verify(entry, tmp_path / "f")


def test_verification_error_is_a_config_error():
    # Callers that catch ConfigError at start-up catch verification failures too.
    assert issubclass(ModelVerificationError, ConfigError)
