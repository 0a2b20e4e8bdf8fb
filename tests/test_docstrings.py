"""Issue 37 ("Read like optax"): the library's public functions document their arguments, and
no library module grows past 400 lines.

Both rules cover every module under ``kdjax/`` but the application, ``kdjax/app/``. A public
function or method (its name, and its class's, without a leading ``_``) that takes arguments
besides ``self``/``cls`` (``*args`` and ``**kwargs`` count) needs a docstring with an ``Args:``
section; ``Returns:``/``Raises:`` are checked by review, not here.
"""

import ast
import pathlib

LIBRARY = pathlib.Path(__file__).resolve().parent.parent / "kdjax"
MAX_LINES = 400

def _library_modules() -> list[pathlib.Path]:
    modules = [p for p in LIBRARY.rglob("*.py") if p.relative_to(LIBRARY).parts[0] != "app"]
    assert modules, f"no modules found under {LIBRARY}"
    return sorted(modules)


def _name(path: pathlib.Path) -> str:
    return path.relative_to(LIBRARY.parent).as_posix()


def _takes_arguments(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    a = fn.args
    named = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    return bool(named or a.vararg or a.kwarg)


def _missing_args(source: str, filename: str = "<module>") -> list[str]:
    """The public functions and methods of a module's ``source`` that take arguments but whose
    docstring has no ``Args:`` section, as ``name`` or ``Class.name``."""
    missing = []

    def visit(body, owner: str = "") -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                if _takes_arguments(node) and "Args:" not in (ast.get_docstring(node) or ""):
                    missing.append(owner + node.name)
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, owner + node.name + ".")

    visit(ast.parse(source, filename=filename).body)
    return missing


def test_public_functions_document_their_arguments():
    missing = {}
    for path in _library_modules():
        names = _missing_args(path.read_text(encoding="utf-8"), str(path))
        if names:
            missing[_name(path)] = names
    assert not missing, "public functions without an Args: section in their docstring:\n" + "\n".join(
        f"  {module}: {', '.join(names)}" for module, names in missing.items())


def test_the_check_finds_what_it_should():
    """The check itself on a small module: public functions and methods with arguments and no
    ``Args:`` are found; private ones, argument-free ones and documented ones are not."""
    source = '''
def documented(x):
    """Doubles.

    Args:
      x: a number.
    """
def undocumented(x):
    """Doubles."""
def no_docstring(**options):
    pass
def no_arguments():
    """Nothing to say."""
def _private(x):
    pass
class Public:
    def method(self, x):
        """Returns x."""
    def bare(self):
        """Returns self."""
    @classmethod
    def build(cls, config):
        pass
class _Private:
    def method(self, x):
        pass
'''
    assert _missing_args(source) == ["undocumented", "no_docstring", "Public.method", "Public.build"]


def test_no_library_module_is_over_400_lines():
    long = {_name(p): n for p in _library_modules() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"library modules over {MAX_LINES} lines (split them, or say more in fewer words): {long}"
