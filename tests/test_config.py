"""dd_jax.config: configs merged over configs/base.py once, at load; unknown fields refused by name. Import graph."""

import ast
import json
import os
import subprocess
import sys

import pytest

from dd_jax import checkpoints, config as config_lib, inference, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "dd_jax", "assets", "tiny")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and key not in config_lib.FREE:
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def _write(path, data) -> str:
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


# ------------------------------------------------------------------ saved configs
def test_a_saved_config_with_an_unknown_field_is_refused_naming_it(tmp_path):
    path = _write(tmp_path / "config.json", {"model": {"preset": "tiny", "nonexistent": 1}})
    with pytest.raises(config_lib.ConfigError, match=r"unknown config field 'model\.nonexistent' in .*config\.json"):
        config_lib.load_json(path)
    with pytest.raises(checkpoints.RunError) as e:  # a run's config.json: one line, naming field and file
        checkpoints.load_config(path)
    assert "'model.nonexistent'" in str(e.value) and path in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(config_lib.ConfigError, match=r"unknown config field 'typo'"):  # a whole unknown group
        config_lib.merge({"typo": {"x": 1}}, "a dict")


def test_a_partial_saved_config_gets_base_defaults(tmp_path):
    path = _write(tmp_path / "config.json", {"model": {"preset": "tiny"}, "sample": {"steps": 2},
                                             "train": {"residual": ["y"]}})
    c = checkpoints.load_config(path)
    base = _flat(config_lib.base().to_dict())
    got = _flat(c.to_dict())
    assert set(got) == set(base)
    assert c.model.preset == "tiny" and c.sample.steps == 2 and tuple(c.train.residual) == ("y",)
    assert {k: v for k, v in got.items() if k not in ("model.preset", "sample.steps", "train.residual")} == \
        {k: v for k, v in base.items() if k not in ("model.preset", "sample.steps", "train.residual")}
    assert c.sample.tile is False and inference.default_mode(c) == "resize"  # saved before sample.tile: resize
    assert c.train.sync_every == 10 and c.train.gpu_memory_fraction == 0.0 and c.model.platform == ""


def test_merge_leaves_its_input_alone_and_checks_types():
    data = {"sample": {"steps": 3}}
    config_lib.merge(data)
    assert data == {"sample": {"steps": 3}}
    with pytest.raises(config_lib.ConfigError, match=r"'lora\.rank' in x\.json: 3\.5 does not fit its type, int"):
        config_lib.merge({"lora": {"rank": 3.5}}, "x.json")
    with pytest.raises(config_lib.ConfigError, match=r"'sample' in the config: a group of fields"):
        config_lib.merge({"sample": 3})


def test_model_params_is_a_free_dict_of_overrides(tmp_path):
    """model.params holds FluxParams overrides: its keys are not in base, and are kept as they are."""
    params = {"hidden_size": 32, "axes_dim": [4, 6, 6], "some_future_field": 1}
    c = config_lib.merge({"model": {"params": params}}, saved=True)
    assert c.model.params.to_dict() == params
    assert config_lib.base().model.params.to_dict() == {}


def test_the_shipped_models_config_loads_as_it_did():
    """dd_jax/assets/tiny was saved before sample.tile (and other fields) existed, and with the removed
    sample.guidance/sample.task: every field it has keeps its value, the rest are base's, which is what the
    code did without them (resize mode, 10-step stop agreement, the current backend, no GPU pool fraction)."""
    meta = checkpoints.read_model_meta(SHIPPED)
    c = checkpoints.model_config(SHIPPED, meta)
    saved, got = _flat(meta["config"]), _flat(checkpoints.config_dict(c))
    assert {k for k in saved if k not in got} == set(config_lib.REMOVED)
    assert all(got[k] == v for k, v in saved.items() if k not in config_lib.REMOVED)
    assert inference.default_mode(c) == "resize"
    assert c.sample.steps == 2 and c.train.guidance == 1.0


# ------------------------------------------------------------------ removed fields
def test_sample_guidance_and_task_are_gone(tmp_path):
    """sample.guidance was never read (sampling uses train.guidance; decompose/evaluate --guidance override
    it) and sample.task neither: both are removed. A saved config may still hold them (dropped on load); a
    config file or a command line that sets one is refused, saying so."""
    base = config_lib.base()
    assert "guidance" not in base.sample and "task" not in base.sample
    old = config_lib.load_json(_write(tmp_path / "old.json", {"sample": {"guidance": 3.5, "task": "", "steps": 4}}))
    assert old.sample.steps == 4 and "guidance" not in old.sample
    with pytest.raises(config_lib.ConfigError, match=r"'sample\.guidance' in mine\.py was removed: .*train\.guidance"):
        config_lib.merge({"sample": {"guidance": 2.0}}, "mine.py")
    user = tmp_path / "configs"
    user.mkdir()
    (user / "mine.py").write_text("from configs import base\n\n\ndef get_config():\n    c = base.get_config()\n"
                                  "    c.sample.guidance = 2.0\n    return c\n")
    with pytest.raises(config_lib.ConfigError, match="'sample.guidance'"):
        config_lib.load_config_file(str(user / "mine.py"))
    r = subprocess.run([sys.executable, "-m", "dd_jax.train", f"--config={REPO}/configs/tiny.py",
                        f"--workdir={tmp_path / 'run'}", "--config.sample.guidance=2.0"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "sample.guidance" in r.stderr and not (tmp_path / "run").exists(), r.stderr


# ------------------------------------------------------------------ config files
def test_config_files_load_merged_with_an_argument(tmp_path):
    h20 = config_lib.load_config_file(os.path.join(REPO, "configs", "gpu_h20.py:xray"))
    h100 = config_lib.load_config_file(os.path.join(REPO, "configs", "gpu_h100.py:xray"))
    assert h20.to_dict() == h100.to_dict()  # one table serves both GPUs
    assert (h20.data.height, h20.data.width, h20.model.remat, h20.train.gpu_memory_fraction) == (512, 1024, "proj", 0.9)
    flux = config_lib.load_config_file(os.path.join(REPO, "configs", "flux.py:schnell"))
    assert (flux.model.preset, flux.sample.steps, flux.text.kind, flux.autoencoder.kind) == \
        ("flux-schnell", 4, "precomputed", "flux")
    saved = tmp_path / "config.json"
    checkpoints.save_config(flux, str(saved))
    assert config_lib.load_config_file(str(saved)).to_dict() == flux.to_dict()  # a saved config round-trips
    with pytest.raises(FileNotFoundError):
        config_lib.load_config_file(str(tmp_path / "missing.py"))


def test_a_config_file_adding_a_field_is_refused(tmp_path):
    (tmp_path / "typo.py").write_text("from configs import base\n\n\ndef get_config():\n    c = base.get_config()\n"
                                      "    c.train.lerning_rate = 1e-3\n    return c\n")
    with pytest.raises(config_lib.ConfigError, match=r"unknown config field 'train\.lerning_rate' in .*typo\.py"):
        config_lib.load_config_file(str(tmp_path / "typo.py"))


def test_sections_default_to_base():
    assert config_lib.section("mesh") == config_lib.base().mesh.to_dict()
    assert config_lib.section("mesh", {"data": -1, "fsdp": 1})["data"] == -1
    assert config_lib.section("distributed", {"enabled": False})["enabled"] is False  # values as given
    with pytest.raises(config_lib.ConfigError, match=r"'mesh\.fdsp'"):
        sharding.make_mesh({"fdsp": 1})


# ------------------------------------------------------------------ the import graph
PACKAGE = os.path.join(REPO, "dd_jax")
PACKAGES = ("dd_jax", "weights_conversion")


def _module(path: str) -> str:
    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _sources(*folders: str) -> list[str]:
    return sorted(os.path.join(d, f) for top in folders for d, _, fs in os.walk(os.path.join(REPO, top))
                  for f in fs if f.endswith(".py"))


def _imports(path: str, modules: set[str], top_level_only: bool = False) -> set[str]:
    """The modules of PACKAGES a file imports (a `from dd_jax import x` of a module counts as importing it)."""
    me = _module(path)
    package = me if path.endswith("__init__.py") else me.rpartition(".")[0]
    tree = ast.parse(open(path).read(), path)
    found = set()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found |= {owner(a.name) for a in node.names if a.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] in PACKAGES:
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else owner(base) for a in node.names}
    return found - {None, me}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_among_our_modules():
    files = _sources(*PACKAGES)
    modules = {_module(p) for p in files}
    top = {_module(p): _imports(p, modules, top_level_only=True) for p in files}
    assert _cycles(top) == []  # module-level imports: none at all
    every = {_module(p): _imports(p, modules) for p in files}  # function-local imports too
    assert _cycles(every) == []
    # a cycle, were there one, is found
    assert _cycles({**every, "dd_jax.data.blend": every["dd_jax.data.blend"] | {"dd_jax.data.synth"}}) != []


def test_nothing_but_its_cli_and_tests_imports_dd_jax_train():
    files = _sources("dd_jax", "scripts", "weights_conversion")
    modules = {_module(p) for p in _sources("dd_jax")}
    importers = [os.path.relpath(p, REPO) for p in files
                 if p != os.path.join(PACKAGE, "train.py") and "dd_jax.train" in _imports(p, modules)]
    assert importers == []
    # the scan sees such an import: dd_jax/train.py's own CLI test would be found in a test file
    assert "dd_jax.train" in _imports(os.path.join(REPO, "tests", "test_train.py"), modules)
