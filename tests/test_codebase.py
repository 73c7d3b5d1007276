"""The house in order: module and function sizes, no import cycle, options declared once."""

import ast
from pathlib import Path
from typing import Literal

import click
from click.testing import CliRunner
from pydantic import BaseModel, Field

from wsimil.cli import main
from wsimil.cli_options import section_options
from wsimil.config import Config, cli_flag

PKG = Path(__file__).resolve().parents[1] / "wsimil"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        name = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        yield name.removesuffix(".__init__"), path


def test_no_module_or_function_is_too_long():
    long_modules, long_functions = [], []
    for name, path in _modules():
        src = path.read_text()
        if len(src.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {n} lines")
    assert long_modules == [] and long_functions == []


def _imports(name: str, path: Path) -> set[str]:
    """wsimil modules imported by a module (top level and inside functions)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.startswith("wsimil")}
    return out


def test_the_import_graph_has_no_cycle():
    modules = dict(_modules())
    graph = {
        name: {t for t in _imports(name, path) if t in modules and t != name}
        for name, path in modules.items()
    }
    # A package's __init__ re-exporting its submodules is not a cycle of the submodules.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_every_stage_setting_is_an_option_of_its_command():
    for section, field_info in Config.model_fields.items():
        model = field_info.annotation
        command = main.commands[section]
        opts = {o for p in command.params for o in p.opts}
        missing = [n for n in model.model_fields if cli_flag(model, n) not in opts]
        assert missing == [], f"wsimil {section} lacks options for {missing}"


def test_a_new_setting_becomes_an_option_with_no_other_edit():
    class Section(BaseModel):
        new_threshold: float = Field(0.5, ge=0, description="a setting added later")
        mode: Literal["fast", "exact"] = Field("fast", description="a choice")
        flag: bool = Field(True, description="a switch")
        widths: list[int] | None = Field(None, description="a list")

    seen = {}

    @click.command()
    @section_options(Section, "tile")
    def cmd(overrides):
        seen.update(overrides["tile"])

    r = CliRunner().invoke(
        cmd, ["--new-threshold", "0.7", "--mode", "exact", "--no-flag", "--widths", "4,2"]
    )
    assert r.exit_code == 0, r.output
    assert seen == {"new_threshold": 0.7, "mode": "exact", "flag": False, "widths": [4, 2]}
    r = CliRunner().invoke(cmd, [])
    assert seen == dict.fromkeys(Section.model_fields)  # not given: the config file decides
    help_text = CliRunner().invoke(cmd, ["--help"]).output
    assert "a setting added later [0.5]" in help_text
    assert CliRunner().invoke(cmd, ["--mode", "slow"]).exit_code != 0


def test_config_mistakes_name_the_key_the_value_and_what_is_allowed(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tile: {tile_px: 0, tile_size: 3}\n")
    r = CliRunner().invoke(main, ["tile", str(tmp_path), "--config", str(cfg)])
    assert r.exit_code != 0
    assert f"{cfg}: tile.tile_px = 0: input should be greater than or equal to 16" in r.output
    assert "tile.tile_size: unknown setting" in r.output
    r = CliRunner().invoke(main, ["train", str(tmp_path), "--folds", "1"])
    assert "--folds = 1: input should be greater than or equal to 2" in r.output
