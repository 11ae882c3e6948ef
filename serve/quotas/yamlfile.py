"""One YAML file as one validated model, with a ConfigError naming the file and the
field (the keys file and the plans file)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError, describe

M = TypeVar("M", bound=BaseModel)


def load(path: Path, model: type[M], what: str) -> M:
    try:
        doc = yaml.safe_load(Path(path).read_text())
        return model.model_validate(doc if doc is not None else {}, strict=False)
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not YAML: {e}") from None
    except ValidationError as e:
        raise ConfigError(f"{what} {path}: {describe(e)}") from None
