# vmrig: what is known about a test script before it runs, from the one definition of
# the API (vmrig_driver.py, executed here as a module without a driver).
#
# Reads one JSON object on stdin, prints one JSON object:
#   {"command": "check", "module": <vmrig_driver.py>, "text": <script>, "filename": ...,
#    "first_line": n, "first_column": n, "machines": [{"name", "python_name"}] | null,
#    "vlans": [n, ...]}
#     -> {"ok": true} | {"syntax": {...}} | {"findings": [{"line", "column", "message",
#        "text", "caret"}]}
#   {"command": "stubs", "module": ..., "machines": [...] | null, "vlans": [...]}
#     -> {"files": {"vmrig_driver.pyi": text, "vmrig_globals.pyi": text,
#        "__builtins__.pyi": text}}
#
# The check is conservative: a finding is a name or call that fails whatever the script
# does at run time. Anything dynamic (a name bound anywhere, `exec`, a star import, an
# attribute set or tested by name, a call with *args or **kwargs) is left alone.
# Keep this file free of syntax newer than Python 3.9.

import ast
import builtins
import difflib
import inspect
import json
import re
import symtable
import sys
import types
import typing

MODULE_NAME = "vmrig_driver"


def load_api(source):
    """vmrig_driver.py as a module, without connecting it to anything."""
    module = types.ModuleType(MODULE_NAME)
    module.__file__ = MODULE_NAME + ".py"
    sys.modules[MODULE_NAME] = module
    exec(compile(source, module.__file__, "exec", dont_inherit=True), module.__dict__)
    return module


def script_globals(api, machines, vlans):
    """The names the script sees, as the driver gives them (`_Session.symbols`)."""
    session = api._Session({"machines": machines, "vlans": vlans}, None)
    return session.symbols()


# ---------------------------------------------------------------------- check

# Names whose use means the script can bind globals the check cannot see.
DYNAMIC_NAMES = {"exec", "eval", "globals", "locals", "vars", "__builtins__", "builtins"}


def bound_names(table, out):
    """Every name bound in any scope of the script, by any means."""
    for sym in table.get_symbols():
        if (
            sym.is_assigned()
            or sym.is_imported()
            or sym.is_parameter()
            or sym.is_namespace()
            or sym.is_declared_global()
            or sym.is_nonlocal()
        ):
            out.add(sym.get_name())
    for child in table.get_children():
        bound_names(child, out)
    return out


def handler_names(handler):
    """The exception class names an `except` clause catches (None: a bare except)."""
    if handler.type is None:
        return None
    types_ = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    names = set()
    for t in types_:
        if isinstance(t, ast.Name):
            names.add(t.id)
        elif isinstance(t, ast.Attribute):
            names.add(t.attr)
    return names


class Guards(ast.NodeVisitor):
    """Marks the nodes inside a `try` whose handlers catch what a finding would raise."""

    def __init__(self):
        self.guarded = {}  # id(node) -> set of caught names, None for everything

    def visit_Try(self, node):
        caught = set()
        for handler in node.handlers:
            names = handler_names(handler)
            if names is None:
                caught = None
                break
            caught |= names
        for stmt in node.body:
            for sub in ast.walk(stmt):
                prev = self.guarded.get(id(sub), set())
                if caught is None or prev is None:
                    self.guarded[id(sub)] = None
                else:
                    self.guarded[id(sub)] = prev | caught
        self.generic_visit(node)

    visit_TryStar = visit_Try

    def catches(self, node, exc_names):
        caught = self.guarded.get(id(node), set())
        if caught is None:
            return True
        return bool(caught & (exc_names | {"Exception", "BaseException"}))


def suggest(word, candidates):
    if not word.startswith("_"):
        candidates = [c for c in candidates if not c.startswith("_")]
    found = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return found[0] if found else None


def describe(name, value, api):
    if isinstance(value, api.Machine):
        return "machine `{}`".format(name)
    if isinstance(value, api.VLan):
        return "VLAN `{}`".format(name)
    if isinstance(value, types.ModuleType):
        return "module `{}`".format(name)
    return "`{}`".format(name)


def attribute_names(value):
    """The attributes `value` has, or None when they cannot be known (a __getattr__)."""
    if not isinstance(value, types.ModuleType):
        if inspect.getattr_static(type(value), "__getattr__", None) is not None:
            return None
    return set(dir(value))


def api_callable(value, attr, api):
    """The bound function `value.attr` when it is the API's own (defined in
    vmrig_driver), else None. Never evaluates a property."""
    static = inspect.getattr_static(value, attr, None)
    if isinstance(static, (staticmethod, classmethod)):
        static = static.__func__
    if not inspect.isfunction(static) or static.__module__ != MODULE_NAME:
        return None
    return getattr(value, attr)


def own_callable(value):
    """`value` when it is a function or bound method of the API, else None."""
    func = getattr(value, "__func__", value)
    if inspect.isfunction(func) and func.__module__ == MODULE_NAME:
        return value
    return None


def signature_text(sig):
    parts = []
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            parts.append("*" + p.name)
        elif p.kind == p.VAR_KEYWORD:
            parts.append("**" + p.name)
        elif p.default is p.empty:
            parts.append(p.name)
        else:
            parts.append("{}=...".format(p.name))
    return "({})".format(", ".join(parts))


def call_problem(call, func, shown):
    """What is wrong with calling `func` (the API's) as `call` does: (node, message) or
    None. Only calls without *args and **kwargs: their arity is known."""
    if any(isinstance(a, ast.Starred) for a in call.args):
        return None
    if any(k.arg is None for k in call.keywords):
        return None
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    params = sig.parameters
    takes = "{}{}".format(shown, signature_text(sig))
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for kw in call.keywords:
        p = params.get(kw.arg)
        if (p is None or p.kind == p.POSITIONAL_ONLY) and not var_kw:
            names = [
                n for n, q in params.items() if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)
            ]
            message = "unknown keyword argument `{}` of `{}`".format(kw.arg, shown)
            better = suggest(kw.arg, names)
            if better:
                message += "; did you mean `{}`?".format(better)
            return kw, message + " (it takes `{}`)".format(takes)
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind == p.VAR_POSITIONAL for p in params.values())
    if not var_pos and len(call.args) > len(positional):
        extra = call.args[len(positional)]
        message = "`{}` takes {} positional argument{} but {} {} given (it takes `{}`)".format(
            shown,
            len(positional),
            "" if len(positional) == 1 else "s",
            len(call.args),
            "was" if len(call.args) == 1 else "were",
            takes,
        )
        return extra, message
    given = {k.arg for k in call.keywords}
    for i, p in enumerate(positional):
        if i < len(call.args):
            if p.name in given:
                return call, "`{}` gets argument `{}` twice (it takes `{}`)".format(
                    shown, p.name, takes
                )
            continue
        if p.default is p.empty and p.name not in given:
            return call, "`{}` is missing its argument `{}` (it takes `{}`)".format(
                shown, p.name, takes
            )
    for p in params.values():
        if p.kind == p.KEYWORD_ONLY and p.default is p.empty and p.name not in given:
            return call, "`{}` is missing its keyword argument `{}` (it takes `{}`)".format(
                shown, p.name, takes
            )
    return None


def check(req):
    filename = req["filename"]
    first_line = max(1, int(req.get("first_line", 1)))
    first_column = max(1, int(req.get("first_column", 1)))
    text = req["text"]
    source = "\n" * (first_line - 1) + text
    lines = source.split("\n")

    def place(lineno, col_offset):
        """The file's line and column (in characters) of an ast position, and the
        column within the line's text shown."""
        line_text = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
        line_text = line_text.rstrip("\r")
        chars = len(line_text.encode("utf-8")[:col_offset].decode("utf-8", errors="replace"))
        column = chars + 1
        if lineno == first_line:
            column += first_column - 1
        return lineno, column, line_text, chars + 1

    try:
        compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as e:
        line_text = e.text.rstrip("\n") if isinstance(e.text, str) else None
        column = e.offset
        if column is not None and e.lineno == first_line:
            column += first_column - 1
        return {
            "syntax": {
                "type": type(e).__name__,
                "message": e.msg,
                "line": e.lineno,
                "column": column,
                "text": line_text,
            }
        }
    except (ValueError, TypeError) as e:
        return {"syntax": {"type": type(e).__name__, "message": str(e), "line": None,
                           "column": None, "text": None}}

    tree = ast.parse(source, filename)
    bound = bound_names(symtable.symtable(source, filename, "exec"), set())
    api = load_api(req["module"])
    machines = req.get("machines")
    known_machines = machines is not None
    symbols = script_globals(api, machines or [], req.get("vlans") or [])
    guards = Guards()
    guards.visit(tree)

    loaded = set()
    star_import = False
    set_attributes = set()  # attributes the script assigns, deletes or names as strings
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            loaded.add(node.id)
        elif isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            # The stubs' globals (`if TYPE_CHECKING: from vmrig_globals import *`, for mypy)
            # are the driver's own: nothing unknown comes in.
            if node.module != "vmrig_globals":
                star_import = True
        elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Load):
            set_attributes.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # getattr(m, "x"), hasattr(m, "x"), setattr(m, "x", ...)
            if node.value.isidentifier():
                set_attributes.add(node.value)
    dynamic = star_import or bool(loaded & DYNAMIC_NAMES) or "builtins" in bound
    if "setattr" in loaded or "__dict__" in set_attributes:
        set_attributes = None

    known = set(dir(builtins)) | set(symbols) | bound | {"__name__", "__file__"}
    findings = []

    def report(node, message, at=None):
        lineno, col = (node.lineno, node.col_offset) if at is None else at
        line, column, line_text, caret = place(lineno, col)
        findings.append(
            {"line": line, "column": column, "message": message, "text": line_text,
             "caret": caret}
        )

    def global_value(name_node):
        """The driver's global a Name refers to, when the script never rebinds it."""
        if not isinstance(name_node, ast.Name) or name_node.id in bound:
            return None
        if name_node.id not in symbols:
            return None
        return symbols[name_node.id]

    reported_calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            name = node.id
            if name in known or dynamic or not known_machines:
                continue
            if name.startswith("__") and name.endswith("__"):
                continue
            if guards.catches(node, {"NameError"}):
                continue
            message = "undefined name `{}`".format(name)
            better = suggest(name, known)
            if better:
                message += "; did you mean `{}`?".format(better)
            report(node, message)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            if set_attributes is None or node.attr in set_attributes:
                continue
            if not isinstance(node.value, ast.Name) or node.value.id not in symbols:
                continue
            value = global_value(node.value)
            if value is None:
                continue
            names = attribute_names(value)
            if names is None or node.attr in names:
                continue
            if guards.catches(node, {"AttributeError"}):
                continue
            what = describe(node.value.id, value, api)
            message = "{} has no attribute `{}`".format(what, node.attr)
            better = suggest(node.attr, names)
            if better:
                message += "; did you mean `{}`?".format(better)
            # Point at the attribute's name, not at the start of `server.`.
            end = getattr(node, "end_col_offset", None)
            end_line = getattr(node, "end_lineno", node.lineno)
            at = (end_line, end - len(node.attr.encode("utf-8"))) if end is not None else None
            report(node, message, at)
            reported_calls.add(id(node))
        elif isinstance(node, ast.Call):
            func = node.func
            target = None
            if isinstance(func, ast.Name):
                value = global_value(func)
                if value is not None:
                    target = own_callable(value)
                    shown = func.id
            elif isinstance(func, ast.Attribute) and id(func) not in reported_calls:
                owner = global_value(func.value)
                if owner is not None:
                    target = api_callable(owner, func.attr, api)
                    shown = "{}.{}".format(func.value.id, func.attr)
            if target is None:
                continue
            if guards.catches(node, {"TypeError"}):
                continue
            problem = call_problem(node, target, shown)
            if problem is not None:
                at_node, message = problem
                report(at_node, message)

    if not findings:
        return {"ok": True}
    findings.sort(key=lambda f: (f["line"], f["column"]))
    return {"findings": findings}


# ---------------------------------------------------------------------- stubs

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def annotation_text(annotation):
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def default_text(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        if len(text) <= 40:
            return text
    return "..."


def one_line_doc(obj):
    # The object's own docstring: inspect.getdoc would inherit object.__init__'s.
    doc = inspect.cleandoc(obj.__doc__) if isinstance(obj.__doc__, str) else None
    if not doc:
        return None
    first = " ".join(doc.split("\n\n")[0].split())
    # The first sentence: a summary line.
    m = re.match(r"(.+?[.!?])(\s|$)", first)
    return (m.group(1) if m else first).replace('"""', "'''")


def def_text(name, func, indent, drop_first, decorator=None):
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    parts = []
    star_done = False
    for i, p in enumerate(params):
        ann = annotation_text(p.annotation)
        if i == 0 and drop_first:
            continue
        if p.kind == p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind == p.VAR_POSITIONAL:
            star_done = True
            text = "*" + p.name
        elif p.kind == p.VAR_KEYWORD:
            text = "**" + p.name
        else:
            text = p.name
        if ann and not (i == 0 and p.name in ("self", "cls")):
            text += ": " + ann
        if p.default is not p.empty:
            text += (" = " if ann else "=") + default_text(p.default)
        parts.append(text)
    ret = annotation_text(sig.return_annotation)
    head = "{}def {}({})".format(indent, name, ", ".join(parts))
    if ret:
        head += " -> " + ret
    out = []
    if decorator:
        out.append(indent + decorator)
    doc = one_line_doc(func)
    if doc:
        out.append(head + ":")
        out.append('{}    """{}"""'.format(indent, doc))
    else:
        out.append(head + ": ...")
    return out


INTERESTING_DUNDERS = {"__init__", "__enter__", "__exit__", "__call__"}


def class_text(cls, api):
    bases = []
    for base in cls.__bases__:
        if base is object:
            continue
        if base.__module__ == MODULE_NAME:
            bases.append(base.__name__)
        elif base.__module__ == "builtins":
            bases.append(base.__name__)
        else:
            # The public name (unittest.TestCase, not unittest.case.TestCase).
            top = base.__module__.split(".")[0]
            if getattr(sys.modules.get(top), base.__name__, None) is base:
                bases.append("{}.{}".format(top, base.__name__))
            else:
                bases.append("{}.{}".format(base.__module__, base.__qualname__))
    head = "class {}{}:".format(cls.__name__, "({})".format(", ".join(bases)) if bases else "")
    out = [head]
    doc = one_line_doc(cls) if cls.__doc__ else None
    if doc:
        out.append('    """{}"""'.format(doc))
    for attr, ann in cls.__dict__.get("__annotations__", {}).items():
        out.append("    {}: {}".format(attr, annotation_text(ann)))
    for attr, value in cls.__dict__.items():
        public = not attr.startswith("_") or attr in INTERESTING_DUNDERS
        if not public:
            continue
        if isinstance(value, staticmethod):
            out += def_text(attr, value.__func__, "    ", False, "@staticmethod")
        elif isinstance(value, property) and value.fget is not None:
            out += def_text(attr, value.fget, "    ", False, "@property")
        elif inspect.isfunction(value):
            out += def_text(attr, value, "    ", False)
    if len(out) == 1:
        out.append("    ...")
    return out


def tokens(lines):
    """The identifiers of stub lines, docstrings left out."""
    code = [line for line in lines if not line.lstrip().startswith('"""')]
    return set(IDENT.findall("\n".join(code)))


def is_own_class(api, name):
    value = getattr(api, name, None)
    return isinstance(value, type) and value.__module__ == MODULE_NAME and value.__name__ == name


def is_own_function(api, name, value):
    return (
        inspect.isfunction(value)
        and value.__module__ == MODULE_NAME
        and getattr(api, value.__name__, None) is value
    )


def element_type(values, api):
    types_ = {type(v) for v in values}
    if len(types_) == 1:
        (t,) = types_
        if t.__module__ == MODULE_NAME:
            return t.__name__
    return "Any"


def header(api, used, builtins_stub=False):
    """Imports for the names `used` in a stub of the API module."""
    used = set(used)
    for name in list(used):
        value = api.__dict__.get(name)
        if getattr(value, "__module__", None) == "typing" and getattr(typing, name, None) is not value:
            used |= set(IDENT.findall(str(value).replace("typing.", "")))
    out = []
    typing_names = []
    aliases = []
    for name in sorted(used):
        value = api.__dict__.get(name)
        if value is None:
            continue
        if isinstance(value, types.ModuleType):
            out.append("import {}".format(name))
        elif getattr(value, "__module__", None) == "typing":
            if getattr(typing, name, None) is value:
                typing_names.append(name)
            else:
                # An alias of the module's own (Seconds = Union[...]).
                aliases.append("{} = {}".format(name, str(value).replace("typing.", "")))
        elif isinstance(value, type) and value.__module__ not in (MODULE_NAME, "builtins"):
            out.append("from {} import {}".format(value.__module__, name))
    if typing_names:
        out.append("from typing import {}".format(", ".join(typing_names)))
    return out + aliases


def stubs(req):
    api = load_api(req["module"])
    machines = req.get("machines")
    if machines is None:
        # Without a test file: the driver's globals only. Two stand-in machines and a VLAN
        # give `machines` and `vlans` their element types; the globals they add are dropped.
        symbols = script_globals(api, [{"name": "a"}, {"name": "b"}], [1])
        per_test = {id(m) for m in symbols["machines"]} | {id(v) for v in symbols["vlans"]}
        symbols = {k: v for k, v in symbols.items() if id(v) not in per_test}
    else:
        symbols = script_globals(api, machines, req.get("vlans") or [])

    # The API module: every class and function the globals reach, with the classes
    # their annotations and bases name.
    functions = [v.__name__ for v in symbols.values() if is_own_function(api, "", v)]
    classes = []
    for v in symbols.values():
        cls = v if isinstance(v, type) else type(v)
        if cls.__module__ == MODULE_NAME and is_own_class(api, cls.__name__):
            classes.append(cls.__name__)
        if isinstance(v, list):
            for item in v:
                if type(item).__module__ == MODULE_NAME:
                    classes.append(type(item).__name__)
    body = {}
    seen = set()
    pending = list(dict.fromkeys(classes))
    for name in functions:
        body[("f", name)] = def_text(name, getattr(api, name), "", False) + [""]
    while pending:
        name = pending.pop(0)
        if name in seen:
            continue
        seen.add(name)
        cls = getattr(api, name)
        lines = class_text(cls, api) + [""]
        body[("c", name)] = lines
        for tok in tokens(lines):
            if is_own_class(api, tok) and tok not in seen:
                pending.append(tok)
    for key in list(body):
        if key[0] == "f":
            for tok in tokens(body[key]):
                if is_own_class(api, tok) and tok not in seen:
                    seen.add(tok)
                    body[("c", tok)] = class_text(getattr(api, tok), api) + [""]
    # Classes in the module's order, so a base comes before its subclasses.
    order = {name: i for i, name in enumerate(api.__dict__)}
    ordered = sorted(body, key=lambda k: (order.get(k[1], 1 << 30), k[1]))
    module_lines = []
    for key in ordered:
        module_lines += body[key]
    aliases = [
        "{} = {}".format(n, v.__name__)
        for n, v in api.__dict__.items()
        if isinstance(v, type) and v.__module__ == MODULE_NAME and v.__name__ != n
        and not n.startswith("_") and v.__name__ in seen
    ]
    module_text = "\n".join(
        ['"""vmrig\'s test-script API (generated by `vmrig stubs` from vmrig_driver.py)."""', ""]
        + header(api, tokens(module_lines))
        + ["", ""]
        + module_lines
        + aliases
    ).rstrip() + "\n"

    # The script's globals: re-exported names, typed values.
    g = ['"""The globals of a vmrig test script (generated by `vmrig stubs`)."""', ""]
    imports = []
    decls = []
    needs = set()
    per_test = []
    for name in sorted(symbols):
        value = symbols[name]
        if isinstance(value, types.ModuleType):
            imports.append("import {} as {}".format(value.__name__, name))
        elif isinstance(value, type) and value.__module__ == MODULE_NAME:
            imports.append("from {} import {} as {}".format(MODULE_NAME, value.__name__, name))
        elif is_own_function(api, name, value):
            imports.append("from {} import {} as {}".format(MODULE_NAME, value.__name__, name))
        elif inspect.ismethod(value):
            decls += def_text(name, value, "", True)
        elif isinstance(value, list):
            elem = element_type(value, api) if value else ("Machine" if name.startswith("machines") else "Any")
            needs.add(elem)
            decls.append("{}: List[{}]".format(name, elem))
        elif type(value).__module__ == MODULE_NAME:
            needs.add(type(value).__name__)
            line = "{}: {}".format(name, type(value).__name__)
            if isinstance(value, (api.Machine, api.VLan)):
                per_test.append(line)
            else:
                decls.append(line)
        else:
            decls.append("{}: Any".format(name))
    for tok in tokens(decls + per_test):
        if is_own_class(api, tok):
            needs.add(tok)
    own = sorted(n for n in needs if is_own_class(api, n))
    typing_names = sorted(n for n in tokens(decls + per_test) if n in ("Any", "Callable", "ContextManager", "Dict", "List", "Optional", "Tuple", "Union"))
    if typing_names:
        g.append("from typing import {}".format(", ".join(typing_names)))
    if own:
        g.append("from {} import {}".format(MODULE_NAME, ", ".join(own)))
    g += imports + [""] + decls
    if per_test:
        g += ["", "# The test's machines and VLANs."] + per_test
    globals_text = "\n".join(g).rstrip() + "\n"
    return {
        "files": {
            MODULE_NAME + ".pyi": module_text,
            "vmrig_globals.pyi": globals_text,
            # pyright and pylance add what this file declares to every file's builtins:
            # the script needs no import.
            "__builtins__.pyi": globals_text,
        }
    }


def main():
    req = json.loads(sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape"))
    if req["command"] == "check":
        answer = check(req)
    else:
        answer = stubs(req)
    sys.stdout.write(json.dumps(answer))


main()
