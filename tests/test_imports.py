"""The import graph: no cycle among vledge's modules, no upward import, no torch in the runtime's closure."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import import_graph as g

# Modules that are the torch side of the project; the runtime (and the registry of families) never reach them.
TORCH_SIDE = ("vledge.models", "vledge.checkpoint", "vledge.training", "vledge.export", "vledge.hf", "torch",
              "torchvision", "onnx", "transformers")


def test_no_import_cycle_among_vledge_modules_even_through_imports_inside_functions():
    found = g.cycles(g.graph_of(g.edges(), deferred=True))
    assert found == [], f"import cycles: {found}"


def _closure(start: str, edges: list[g.Edge]) -> dict[str, list[str]]:
    """Every module ``start`` may import (at import time or when a function runs), with one path to it."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if not edge.type_only:
            graph.setdefault(edge.source, set()).add(edge.target)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop()
        for target in sorted(graph.get(node, ())):
            if target not in paths:
                paths[target] = paths[node] + [target]
                queue.append(target)
    return paths


def _forbidden(paths: dict[str, list[str]], prefixes: tuple[str, ...]) -> dict[str, list[str]]:
    return {name: path for name, path in paths.items()
            if any(name == p or name.startswith(p + ".") for p in prefixes)}


def test_the_runtime_never_reaches_torch_or_the_training_side():
    edges = g.edges(include_external=True)
    paths = _closure("vledge.runtime", edges)
    assert "vledge.runtime.loader" in paths and "vledge.families" in paths  # the walk sees the real graph
    bad = _forbidden(paths, TORCH_SIDE)
    assert bad == {}, "the runtime's import closure reaches: " + "; ".join(" -> ".join(p) for p in bad.values())


def test_family_facts_are_torch_free_until_a_model_is_built():
    """A family module imports torch code only inside the methods that build a module (never at import time)."""
    edges = g.edges(include_external=True)
    eager = [e for e in edges if e.source.startswith("vledge.families") and not e.deferred and not e.type_only
             and any(e.target == p or e.target.startswith(p + ".") for p in TORCH_SIDE)]
    assert eager == [], eager


def test_no_upward_imports():
    """The library never imports its command line, and the layers below the exporter never import it."""
    edges = g.edges()
    upward = [e for e in edges if not e.type_only and (
        (e.target.startswith("vledge.cli") and not e.source.startswith(("vledge.cli", "vledge.__main__")))
        or (e.target.startswith("vledge.export") and e.source.startswith(
            ("vledge.runtime", "vledge.models", "vledge.families", "vledge.hf", "vledge.config", "vledge.manifest")))
        or (e.target.startswith(("vledge.serve", "vledge.bulk", "vledge.webcam", "vledge.benchmark"))
            and e.source.startswith(("vledge.runtime", "vledge.export", "vledge.models", "vledge.families")))
    )]
    assert upward == [], [f"{e.source}:{e.line} -> {e.target}" for e in upward]


def test_the_graph_reader_sees_imports_it_must_see():
    """The checks above are only as good as the walk: known edges, deferred and eager, are found."""
    edges = {(e.source, e.target, e.deferred) for e in g.edges()}
    assert ("vledge.runtime.loader", "vledge.manifest", False) in edges
    assert ("vledge.families.llama", "vledge.models.llama", True) in edges
    assert ("vledge.config", "vledge.families", False) in edges


def test_importing_the_runtime_and_reading_a_family_with_torch_blocked():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "onnx", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import vledge.runtime
        from vledge.families import language_families, vision_families
        from vledge.config import preset, to_dict, from_dict, ModelConfig
        names = sorted(f.name for f in language_families()) + sorted(f.name for f in vision_families())
        config, _ = preset("small")
        assert from_dict(ModelConfig, to_dict(config)) == config
        print(" ".join(names))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["llama", "lstm", "mistral", "qwen2", "transformer", "clip", "convnet",
                                   "efficientnet_b0", "idefics3", "mobilenet_v3_small", "resnet18", "siglip"]
