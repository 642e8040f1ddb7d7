"""The layout: thin scripts over library modules, no import cycle, each Config field declared once."""
import ast
import dataclasses
import importlib
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("ddpm", "ddpm_conditional", "ddpm_img2img", "train_sd", "train_vae", "sample", "evaluate", "visualize",
           "compare", "bench")  # the entry scripts: each ends in `if __name__ == "__main__"`
TRAINING = ("ddpm", "ddpm_conditional", "ddpm_img2img", "train_sd", "train_vae")


def project_modules():
    return sorted(path.stem for path in REPO.glob("*.py"))


def imports(name):
    """The project modules that module `name` imports anywhere: at the top, or inside a function."""
    tree = ast.parse((REPO / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(project_modules())


def test_every_script_is_an_entry_script_and_the_list_is_complete():
    for name in project_modules():
        is_script = 'if __name__ == "__main__":' in (REPO / f"{name}.py").read_text()
        assert is_script == (name in SCRIPTS), name


def test_no_module_imports_a_script():
    """A script is a command, never a library: what another file needs lives in a library module. (Not even ddpm.py
    for `Diffusion`: its math is diffusion.py's, and ddpm.py imports it for users who write `from ddpm import
    Diffusion`.)"""
    for name in project_modules():
        for imported in imports(name) & set(SCRIPTS):
            assert False, f"{name}.py imports the script {imported}.py"


def test_the_import_graph_has_no_cycle():
    graph = {name: imports(name) for name in project_modules()}
    done, path = set(), []

    def visit(name):
        if name in path:
            cycle = path[path.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_an_import_inside_a_function_is_only_an_optional_or_heavy_third_party_package():
    for name in project_modules():
        tree = ast.parse((REPO / f"{name}.py").read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    local = [m for m in modules if m.split(".")[0] in project_modules()]
                    assert not local, f"{name}.py imports {local} inside {function.name}()"


def test_each_training_config_field_is_declared_once_with_one_help_text():
    """The training scripts' Configs compose config.py's groups: a field they share has one help text, and a field
    declared in a script is that script's alone."""
    helps = {}
    for name in TRAINING:
        for field in dataclasses.fields(importlib.import_module(name).Config):
            helps.setdefault(field.name, set()).add(field.metadata["help"])
    assert {name: texts for name, texts in helps.items() if len(texts) > 1} == {}
    for name in TRAINING:
        tree = ast.parse((REPO / f"{name}.py").read_text())
        config = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Config")
        own = {node.target.id for node in config.body if isinstance(node, ast.AnnAssign)}
        others = {field for other in TRAINING if other != name
                  for field in (f.name for f in dataclasses.fields(importlib.import_module(other).Config))}
        assert own & others == set(), f"{name}.py declares fields another script has: {sorted(own & others)}"
