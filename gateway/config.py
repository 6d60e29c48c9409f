"""Loading gateway.yaml and policy.yaml: every error reported with its path, or nothing starts."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from policies.schema import Policy

from .settings import Settings

__all__ = ["ConfigError", "default_config_dir", "load_policy", "load_settings", "parse_policy"]


class ConfigError(Exception):
    """A config file is unreadable or invalid; `errors` holds one 'path: message' per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))

    def render(self) -> str:
        lines = [f"invalid config {self.source}:"] + [f"  - {e}" for e in self.errors]
        return "\n".join(lines)


def validation_messages(exc: ValidationError) -> list[str]:
    """Pydantic errors as 'dotted.path[0]: message' lines."""
    out = []
    for err in exc.errors():
        path = ""
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        out.append(f"{path or '(root)'}: {err['msg']}")
    return out


def default_config_dir() -> Path | None:
    """./config when run from a checkout, else the copy shipped inside the package."""
    package = Path(__file__).parent
    for candidate in (Path("config"), package / "_config", package.parent / "config"):
        if (candidate / "gateway.yaml").is_file():
            return candidate
    return None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) if path.exists() else {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), [f"cannot read: {exc}"]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["(root): expected a mapping"])
    return data


def load_settings(config_dir: Path | None = None) -> Settings:
    """Defaults, then gateway.yaml from config_dir, then IMAGEGW_* environment variables. A config folder
    that was named must exist; a relative data_dir in gateway.yaml is relative to the config folder (so the
    CLI finds the same audit log from anywhere)."""
    if config_dir is not None and not config_dir.is_dir():
        raise ConfigError(str(config_dir), ["no such config folder (it should hold gateway.yaml and policy.yaml)"])
    config_dir = config_dir or default_config_dir()
    source = str(config_dir / "gateway.yaml") if config_dir else "defaults"
    data = _read_yaml(config_dir / "gateway.yaml") if config_dir else {}
    packaged = config_dir is not None and config_dir.resolve() == (Path(__file__).parent / "_config").resolve()
    if config_dir is not None and not packaged and "data_dir" in data and not Path(str(data["data_dir"])).is_absolute():
        data["data_dir"] = (config_dir / str(data["data_dir"])).resolve()
    data.setdefault("config_dir", config_dir)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(source, validation_messages(exc)) from exc


def parse_policy(data: dict | str, source: str = "policy") -> Policy:
    """A Policy from a mapping or YAML text, or ConfigError with every error's path."""
    if isinstance(data, str):
        try:
            data = yaml.safe_load(data) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError(source, ["(root): expected a mapping"])
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, validation_messages(exc)) from exc


def load_policy(settings: Settings) -> Policy:
    """The policy file named by settings, or the built-in defaults when there is none."""
    if settings.config_dir is None:
        return Policy()
    path = settings.config_dir / settings.policy_file
    return parse_policy(_read_yaml(path), str(path))
