"""Bad user input, and the one-line messages it gets."""


class ConfigError(ValueError):
    """Bad user input: reported as one line, without a traceback."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def one_of(value: str, choices, key: str) -> None:
    require(value in choices, f"{key}={value!r} is not one of {', '.join(choices)}")


def one_line(err: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages folded into one line, without the debugging noise."""
    parts, options = [], []
    chain = [err]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for line in "\n".join(str(e) for e in chain).splitlines():
        line = line.strip()
        if line.startswith(("reference_type", "object_type", "To append", "Config search path", "provider=",
                            "Set the environment", "full_key:")) or not line:
            continue
        if line.startswith("Available options in"):
            parts.append(line.rstrip(":") + ":")
        elif parts and parts[-1].endswith(":") and line.isidentifier():
            options.append(line)
        else:
            parts.append(line)
    text = " ".join(parts)
    return text + (" " + ", ".join(options) if options else "")
