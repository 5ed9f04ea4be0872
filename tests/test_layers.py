"""The import rules of docs/architecture.md, read from the source (module-level and in-function imports)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "lowcomm"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module, at module level) for every import in ``path``; imports under
    ``if TYPE_CHECKING:`` are left out (they never run)."""
    tree = ast.parse(path.read_text())
    pkg = _module(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = pkg[: len(pkg) - child.level + 1] if child.level else []
                mod = ".".join([*base, child.module] if child.module else base)
                out.append((mod, top))
                out.extend((f"{mod}.{a.name}", top) for a in child.names)  # "from . import x"
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            visit(child, inner if not isinstance(child, ast.ClassDef) else top)

    visit(tree, True)
    return out


def _files(*packages: str) -> list[Path]:
    return [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]


def _violations(files, forbidden, module_level_only=False):
    bad = []
    for f in files:
        for mod, top in _imports(f):
            if module_level_only and not top:
                continue
            if any(mod == x or mod.startswith(x + ".") for x in forbidden):
                bad.append(f"{f.relative_to(ROOT.parent)} imports {mod}")
    return bad


RULES = [
    # (what, files, forbidden imports, module level only)
    (
        "optim is pure tensor math",
        _files("optim"),
        ["torch.distributed", "lowcomm.runtime", "zmq", "socket"],
        False,
    ),
    (
        "comm knows nothing of the algorithm or the runtime",
        _files("comm"),
        ["lowcomm.optim", "lowcomm.runtime"],
        False,
    ),
    (
        "kernels know nothing of replicas",
        _files("kernels"),
        ["lowcomm.comm", "lowcomm.optim", "lowcomm.runtime", "lowcomm.scaling", "torch.distributed"],
        False,
    ),
    ("lm is a model and its data", _files("lm"), ["lowcomm.runtime", "lowcomm.optim", "lowcomm.comm"], False),
    (
        "scaling fits and reports import nothing of training",
        [ROOT / "scaling" / f for f in ("fit.py", "analyze.py", "records.py", "report.py")],
        ["lowcomm.runtime", "lowcomm.optim", "lowcomm.comm", "lowcomm.lm", "lowcomm.kernels", "torch"],
        False,
    ),
    (
        "the elastic runtime knows nothing of the trainer or of fault plans",
        _files("runtime/elastic"),
        ["lowcomm.runtime.trainer", "lowcomm.runtime.faults", "lowcomm.runtime.cli"],
        False,
    ),
    (
        "fault injection does not reach into the trainer",
        _files("runtime/faults"),
        ["lowcomm.runtime.trainer"],
        False,
    ),
    (
        "the trainer loads the elastic runtime only for an elastic job (its worker module)",
        [p for p in _files("runtime/trainer") if p.name != "worker.py"],
        ["lowcomm.runtime.elastic", "lowcomm.runtime.faults", "zmq"],
        True,
    ),
    (
        "the integrations sit on the public layers, not on the runtime",
        _files("integrations"),
        ["lowcomm.runtime", "zmq", "msgpack"],
        False,
    ),
    (
        "only lowcomm.integrations imports a training framework",
        [p for p in ROOT.rglob("*.py") if "integrations" not in p.parts],
        ["lightning", "pytorch_lightning", "transformers", "accelerate"],
        False,
    ),
    (
        "the runtime's top level needs no pyzmq",
        [
            ROOT / "runtime" / f
            for f in ("__init__.py", "hooks.py", "errors.py", "net.py", "forkserver.py", "cli.py")
        ],
        ["lowcomm.runtime.elastic", "lowcomm.runtime.faults", "zmq"],
        True,
    ),
]


@pytest.mark.parametrize("what,files,forbidden,top", RULES, ids=[r[0] for r in RULES])
def test_layers_import_only_what_they_may(what, files, forbidden, top):
    assert files, f"no files for rule {what!r}"
    assert _violations(files, forbidden, top) == []


def test_the_checker_sees_relative_and_in_function_imports(tmp_path):
    # the rule above must be able to fail: a module that breaks each kind of rule is caught
    bad = ROOT / "optim" / "_layers_probe.py"
    bad.write_text("def f():\n    import torch.distributed as dist\n\nfrom ..runtime import errors\n")
    try:
        found = _violations([bad], ["torch.distributed", "lowcomm.runtime"])
        assert found == [
            "lowcomm/optim/_layers_probe.py imports torch.distributed",
            "lowcomm/optim/_layers_probe.py imports lowcomm.runtime",
            "lowcomm/optim/_layers_probe.py imports lowcomm.runtime.errors",
        ]
        assert _violations([bad], ["torch.distributed"], module_level_only=True) == []
    finally:
        bad.unlink()


def test_import_lowcomm_loads_no_optional_dependency():
    """Nor Triton (a third of a second a process) until a low-precision layer is made, which loads
    the kernels' modules and so registers their operators before anything compiles."""
    code = (
        "import sys, lowcomm, lowcomm.runtime, lowcomm.optim, lowcomm.comm, lowcomm.integrations;"
        "import lowcomm.runtime.trainer.loop;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('zmq', 'scipy', 'matplotlib', 'msgpack',"
        " 'lightning', 'transformers', 'accelerate', 'triton')"
        " or m.startswith(('lowcomm.runtime.elastic', 'lowcomm.scaling', 'lowcomm.kernels.triton_'))));"
        "lowcomm.kernels.LowPrecisionLinear(32, 32, recipe='fp8_rowwise');"
        "print(sorted(m for m in sys.modules if m.startswith('lowcomm.kernels.triton_')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.strip().splitlines()
    assert before == "[]"
    assert after == str([f"lowcomm.kernels.triton_{m}" for m in ("fp8", "mx_gemm", "quantize")])


def test_lowcomm_launch_starts_without_torch(capsys):
    """The launcher only starts the processes that train: it loads no torch (two seconds a process
    here), nor does ``lowcomm keys``; a line that runs ``train`` still parses, and shows, every
    configuration flag."""
    import argparse

    from lowcomm.runtime.cli import COMMANDS, build_parser, main

    code = (
        "import sys; from lowcomm.runtime.cli import main;"
        "rc = main(['launch', '--replicas', '2', '--', sys.executable, '-c', 'pass']) + main(['keys']);"
        "print(rc, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    key, *rest = out.stdout.split()  # (`lowcomm keys` too)
    assert len(key) == 64 and rest == ["0", "False"], out.stderr
    subcommands = next(
        a for a in build_parser(train_flags=False)._actions if isinstance(a, argparse._SubParsersAction)
    )
    assert tuple(subcommands.choices) == COMMANDS
    with pytest.raises(SystemExit):
        main(["--log-level", "INFO", "train", "--help"])
    assert "--model-dim" in capsys.readouterr().out


@pytest.mark.parametrize(
    "missing,argv,extra",
    [
        ("zmq", ["status", "tcp://127.0.0.1:1"], "elastic"),
        ("msgpack", ["coordinator", "--job", "x"], "elastic"),
    ],
)
def test_a_command_whose_extra_is_missing_names_the_extra(missing, argv, extra):
    """With the module made unimportable, the command ends in one line naming the extra, exit 2."""
    assert_names_the_extra(missing, argv, extra, "the elastic runtime")


def assert_names_the_extra(missing: str, argv: list[str], extra: str, feature: str) -> None:
    code = (
        f"import sys; sys.modules[{missing!r}] = None; "
        f"from lowcomm.runtime.cli import main; sys.exit(main({argv!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == (
        f"lowcomm: error: {feature} needs {missing}, which is not installed: pip install 'lowcomm[{extra}]'"
    )
    assert "Traceback" not in out.stderr and [line for line in lines if "error" in line] == lines[-1:], lines
