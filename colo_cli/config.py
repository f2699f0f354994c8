"""``serve --config FILE``: every option of ``serve`` from a TOML file.

A key is an option's long name without the dashes (``compare-timeout``;
QEMU's property spelling with underscores, ``compare_timeout``, is
accepted too), its value what the option takes: a string, a number, a
boolean for a flag, a list for an option that may be repeated
(``ignore``).  Options given on the command line win over the file, so one
file per instance can be overridden for a run; the file is read with
``tomllib`` (Python 3.11's) and checked whole before anything starts: an
unknown key, a value of the wrong type or a syntax error is one line naming
the file and the key.

The file becomes click's ``default_map`` for the command, so each value is
converted and validated by the option itself, exactly as on the command
line.
"""

from __future__ import annotations

import click

from .errors import ColoError, os_error_text

__all__ = ["ConfigError", "config_option", "load"]


class ConfigError(ColoError):
    """A config file that cannot be used: one line naming it."""


def _options_by_key(command: click.Command) -> dict[str, click.Option]:
    """Every option of ``command`` by its config key (long name, no dashes)."""
    keys = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "config":
            continue
        longs = [o for o in param.opts if o.startswith("--")] or param.opts
        keys[longs[0].lstrip("-")] = param
    return keys


def load(path: str, command: click.Command, ctx: click.Context | None = None) -> dict:
    """The ``default_map`` a config file gives ``command``: {param name: value}."""
    import tomllib      # only when a file is given: every command starts faster
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {os_error_text(e)}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8") from None
    options = _options_by_key(command)
    default_map = {}
    for key, value in doc.items():
        param = options.get(key.replace("_", "-"))
        if param is None:
            if isinstance(value, dict):
                raise ConfigError(f"{path}: [{key}]: tables are not used; write every option at "
                                  "the top level")
            raise ConfigError(f"{path}: unknown option {key!r} (keys are the long option names "
                              f"of 'colo-compare {command.name} --help', without '--')")
        if param.multiple:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise ConfigError(f"{path}: {key}: expected a list of strings")
        elif isinstance(value, (list, dict)):
            raise ConfigError(f"{path}: {key}: expected one value, not a {type(value).__name__}")
        if getattr(param, "_flag_needs_value", False) and not param.multiple:
            # an option whose value may be left out (--hexdump [N|all]): true
            # is the option alone, a number its value
            if value is True:
                value = param.flag_value
            elif isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
        if param.is_flag:
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: {key}: expected true or false")
        else:
            numeric = isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType))
            for item in (value if param.multiple else [value]):
                if isinstance(item, bool) or not isinstance(item, (str, int, float) if numeric else str):
                    raise ConfigError(f"{path}: {key}: expected {'a number' if numeric else 'a string'}"
                                      f", not {_toml_type(item)}")
        if ctx is not None:
            try:
                param.type_cast_value(ctx, value)
            except click.BadParameter as e:
                raise ConfigError(f"{path}: {key}: {e.format_message()}") from None
        default_map[param.name] = value
    return default_map


def _toml_type(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), "a date or time")


def _load_into_context(ctx: click.Context, _param, path):
    if path is None or ctx.resilient_parsing:
        return path
    try:
        ctx.default_map = {**(ctx.default_map or {}), **load(path, ctx.command, ctx)}
    except ConfigError as e:
        raise click.UsageError(str(e), ctx) from None
    return path


def config_option(f):
    """``--config FILE`` for a command: read first (eager), so every other
    option takes its default from the file and the command line still wins."""
    return click.option(
        "--config", type=click.Path(dir_okay=False), metavar="FILE", is_eager=True,
        expose_value=False, callback=_load_into_context,
        help="Read options from a TOML file: keys are the long option names without '--' "
             "(primary-in = \"tcp:127.0.0.1:9001\", compare-timeout = 3000, ignore = [\"dns.id\"]); "
             "options on the command line win.")(f)
