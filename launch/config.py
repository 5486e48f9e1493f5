"""Launch files: which `chunkbus` nodes to start, with what options, in what order.

    nodes:
      broker:
        command: broker                 # a chunkbus subcommand
        options: {frontend: "tcp://*:5555", metrics-port: 9100}
        env: {CUDA_VISIBLE_DEVICES: "0"}
        restart: always                 # never (default) | on-failure | always
        max-restarts: 5                 # then the launch stops, failed
        after: [other_node]             # start once those said they are ready

`${VAR}` and `${VAR:-default}` in any string come from the environment. Every error
names the file, the line and the field.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

RESTART_POLICIES = ("never", "on-failure", "always")
NODE_FIELDS = {"command", "options", "env", "restart", "max-restarts", "after"}
NOT_NODES = {"launch"}  # subcommands that may not be launched from a launch file
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class LaunchError(ValueError):
    """A launch file that cannot be used; the text names the file, line and field."""


@dataclass
class NodeSpec:
    name: str
    command: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    restart: str = "never"
    max_restarts: int = 5
    after: list[str] = field(default_factory=list)
    line: int = 0


def _where(path: Path, node: yaml.Node, field_path: str) -> str:
    return f"{path}:{node.start_mark.line + 1}: {field_path}"


def _substitute(text: str, where: str) -> str:
    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise LaunchError(f"{where}: environment variable {name} is not set (or write ${{{name}:-default}})")

    return _VARIABLE.sub(replace, text)


def _scalar(node: yaml.Node, where: str) -> Any:
    """A scalar's value, with ${VAR} substituted, typed as YAML would type the result."""
    if not isinstance(node, yaml.ScalarNode):
        raise LaunchError(
            f"{where}: expected a single value, got a {'list' if isinstance(node, yaml.SequenceNode) else 'map'}"
        )
    text = _substitute(node.value, where)
    if node.style in ("'", '"'):
        return text
    return yaml.safe_load(text) if text else ""


def _mapping(node: yaml.Node, where: str) -> list[tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise LaunchError(f"{where}: expected a map of names to values")
    return node.value


def _option_args(command: click.Command, options: yaml.Node, path: Path, prefix: str) -> list[str]:
    """Command-line arguments for `options`, each checked against the subcommand's own options."""
    params = {
        opt.lstrip("-"): param
        for param in command.params
        if isinstance(param, click.Option)
        for opt in param.opts
        if opt.startswith("--")
    }
    context = click.Context(command)
    args: list[str] = []
    for key_node, value_node in _mapping(options, _where(path, options, prefix)):
        key = key_node.value
        where = _where(path, key_node, f"{prefix}.{key}")
        param = params.get(key)
        if param is None:
            known = ", ".join(sorted(params))
            raise LaunchError(f"{where}: unknown option {key!r} for `chunkbus {command.name}` (options: {known})")
        values = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        if len(values) > 1 and not param.multiple:
            raise LaunchError(f"{where}: {key} takes one value, not a list")
        for item in values:
            value = _scalar(item, where)
            if param.is_flag:
                if not isinstance(value, bool):
                    raise LaunchError(f"{where}: {key} is a flag: write true or false, not {value!r}")
                if value:
                    args.append(f"--{key}")
                continue
            try:
                param.type.convert(value, param, context)
            except click.BadParameter as exc:
                raise LaunchError(f"{where}: {exc.format_message()}") from None
            args += [f"--{key}", str(value)]
    return args


def load(path: str | Path, commands: dict[str, click.Command]) -> list[NodeSpec]:
    """Read and check a launch file against the `chunkbus` subcommands in `commands`."""
    path = Path(path)
    try:
        root = yaml.compose(path.read_text())
    except FileNotFoundError:
        raise LaunchError(f"{path}: no such launch file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise LaunchError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if root is None:
        raise LaunchError(f"{path}: the file is empty: it needs a `nodes:` map")
    top = dict((k.value, (k, v)) for k, v in _mapping(root, f"{path}:1"))
    if set(top) - {"nodes"}:
        key, _ = top[sorted(set(top) - {"nodes"})[0]]
        raise LaunchError(f"{_where(path, key, key.value)}: unknown top-level field (only `nodes:`)")
    if "nodes" not in top:
        raise LaunchError(f"{path}:1: missing field `nodes`")
    specs: list[NodeSpec] = []
    for name_node, body in _mapping(top["nodes"][1], _where(path, top["nodes"][0], "nodes")):
        name = name_node.value
        prefix = f"nodes.{name}"
        fields = {k.value: (k, v) for k, v in _mapping(body, _where(path, name_node, prefix))}
        for key in fields:
            if key not in NODE_FIELDS:
                raise LaunchError(
                    f"{_where(path, fields[key][0], f'{prefix}.{key}')}: unknown field "
                    f"(fields: {', '.join(sorted(NODE_FIELDS))})"
                )
        if "command" not in fields:
            raise LaunchError(f"{_where(path, name_node, prefix)}: missing field `command`")
        command_name = _scalar(fields["command"][1], _where(path, fields["command"][1], f"{prefix}.command"))
        command = commands.get(command_name)
        if command is None or command_name in NOT_NODES:
            known = ", ".join(sorted(set(commands) - NOT_NODES))
            raise LaunchError(
                f"{_where(path, fields['command'][1], f'{prefix}.command')}: unknown subcommand "
                f"{command_name!r} (commands: {known})"
            )
        spec = NodeSpec(name=name, command=command_name, args=[], line=name_node.start_mark.line + 1)
        if "options" in fields:
            spec.args = _option_args(command, fields["options"][1], path, f"{prefix}.options")
        if "env" in fields:
            for key, value in _mapping(fields["env"][1], _where(path, fields["env"][1], f"{prefix}.env")):
                spec.env[key.value] = str(_scalar(value, _where(path, key, f"{prefix}.env.{key.value}")))
        if "restart" in fields:
            node = fields["restart"][1]
            spec.restart = _scalar(node, _where(path, node, f"{prefix}.restart"))
            if spec.restart not in RESTART_POLICIES:
                raise LaunchError(
                    f"{_where(path, node, f'{prefix}.restart')}: {spec.restart!r} is not one of "
                    f"{', '.join(RESTART_POLICIES)}"
                )
        if "max-restarts" in fields:
            node = fields["max-restarts"][1]
            value = _scalar(node, _where(path, node, f"{prefix}.max-restarts"))
            if type(value) is not int or value < 0:
                raise LaunchError(
                    f"{_where(path, node, f'{prefix}.max-restarts')}: expected a whole number >= 0, got {value!r}"
                )
            spec.max_restarts = value
        if "after" in fields:
            node = fields["after"][1]
            items = node.value if isinstance(node, yaml.SequenceNode) else [node]
            spec.after = [str(_scalar(item, _where(path, item, f"{prefix}.after"))) for item in items]
        specs.append(spec)
    _check_order(specs, path, root)
    return specs


def _check_order(specs: list[NodeSpec], path: Path, root: yaml.Node) -> None:
    names = {spec.name: spec for spec in specs}
    for spec in specs:
        for target in spec.after:
            if target not in names:
                raise LaunchError(
                    f"{path}:{spec.line}: nodes.{spec.name}.after: unknown node {target!r} "
                    f"(nodes: {', '.join(names)})"
                )
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join(trail[trail.index(name):] + [name])
            raise LaunchError(f"{path}:{names[name].line}: nodes.{name}.after: a cycle: {cycle}")
        state[name] = "visiting"
        for target in names[name].after:
            visit(target, trail + [name])
        state[name] = "done"

    for spec in specs:
        visit(spec.name, [])


def start_order(specs: list[NodeSpec]) -> list[NodeSpec]:
    """Each node after the nodes it waits for (the file's order otherwise)."""
    ordered: list[NodeSpec] = []
    placed: set[str] = set()
    present = {spec.name for spec in specs}  # --only may leave out a node others wait for
    while len(ordered) < len(specs):
        for spec in specs:
            if spec.name not in placed and all(a in placed or a not in present for a in spec.after):
                ordered.append(spec)
                placed.add(spec.name)
    return ordered
