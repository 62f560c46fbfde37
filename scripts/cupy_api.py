"""Writes tests/cupy_api_<major>.json: the public functions of the module ``cupy`` and the
attributes of ``cupy.ndarray``, each with the keyword arguments it takes, as the installed CuPy
has them. tests/fake_cupy.py allows only what every recorded version has (the names in all the
files, each with the keywords all of them take), so device code that passes on the stand-in
calls nothing that CuPy 13 or 14 lacks. CuPy imports without a GPU; the files in the
repository came from

    pip install cupy-cuda12x==14.2.0 && python scripts/cupy_api.py   # tests/cupy_api_14.json
    pip install cupy-cuda12x==13.6.0 && python scripts/cupy_api.py   # tests/cupy_api_13.json
"""

import inspect
import json
import pathlib
import re

import cupy

# a docstring's first line, as CuPy's ufuncs and Cython methods carry it: name(a, b=1, *, c=None)
_DOC_SIGNATURE = re.compile(r"^\s*[\w.]+\((?P<params>.*)\)")


def keywords(obj):
    """The names ``obj`` accepts as keyword arguments; None if it takes any (``**kwargs``) or
    if its signature cannot be read."""
    try:
        params = inspect.signature(obj).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return sorted(p.name for p in params
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")
    except (TypeError, ValueError):
        pass
    match = _DOC_SIGNATURE.match((obj.__doc__ or "").lstrip().split("\n")[0])
    if match is None:
        return None
    names = []
    params = match.group("params").replace("\\*", "*").replace("[", ",").replace("]", ",")
    params = re.sub(r"\([^()]*\)", "()", params)  # a default such as out=(None, None)
    for part in params.split(","):  # "[, out2]": optional outputs; "int axis=-1": a C type
        words = part.split("=")[0].split()
        name = words[-1] if words else ""
        if name.startswith("**"):
            return None
        if name == "/":  # the names before it are positional only
            names = []
        elif name and name not in ("*", "self") and not name.startswith("*"):
            names.append(name)
    return sorted(names)


def describe(namespace, names):
    out = {}
    for name in names:
        obj = getattr(namespace, name)
        if inspect.ismodule(obj):
            continue
        out[name] = keywords(obj) if callable(obj) and not isinstance(obj, type) else "attribute"
    return out


def main():
    api = {
        "cupy_version": cupy.__version__,
        "cupy": describe(cupy, [n for n in dir(cupy) if not n.startswith("_")]),
        "ndarray": describe(cupy.ndarray, [n for n in dir(cupy.ndarray) if not n.startswith("_")]),
    }
    major = cupy.__version__.split(".")[0]
    path = pathlib.Path(__file__).resolve().parents[1] / "tests" / f"cupy_api_{major}.json"
    path.write_text(json.dumps(api, indent=1, sort_keys=True) + "\n")
    print(f"{path}: {len(api['cupy'])} functions and names, {len(api['ndarray'])} array attributes")


if __name__ == "__main__":
    main()
