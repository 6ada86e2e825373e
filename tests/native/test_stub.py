"""native/_fscached_native.pyi declares what fscached_native.h does (mypy reads the stub, not
the compiled module): a function added to the header without the stub fails here."""
import ast
import re
from pathlib import Path

NATIVE = Path(__file__).resolve().parents[2] / "native"


def _header_functions() -> dict[str, int]:
    """name -> number of parameters, for every function the header declares."""
    text = re.sub(r"/\*.*?\*/", "", (NATIVE / "fscached_native.h").read_text(), flags=re.S)
    out = {}
    for m in re.finditer(r"\b(fsc_\w+)\s*\(([^)]*)\)\s*;", text):
        params = [p for p in m.group(2).split(",") if p.strip() and p.strip() != "void"]
        out[m.group(1)] = len(params)
    return out


def _stub_functions() -> dict[str, int]:
    tree = ast.parse((NATIVE / "_fscached_native.pyi").read_text())
    lib = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Lib")
    return {f.name: len(f.args.posonlyargs) + len(f.args.args) - 1  # without self
            for f in lib.body if isinstance(f, ast.FunctionDef)}


def test_stub_declares_every_header_function_with_its_arity():
    header = _header_functions()
    assert len(header) >= 10  # the parse found the declarations
    assert _stub_functions() == header
