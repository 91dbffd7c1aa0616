"""Make the tensorrt-stubs package readable by mypy (CI only; TensorRT itself cannot be installed here).

tensorrt-stubs 10.13 ships without py.typed markers and with a few generated signatures that are not
valid Python (a parameter named `in`, required parameters after defaulted ones). This renames and
defaults those parameters and adds the markers, leaving every other annotation as published.
"""

import ast
import re
import sys
import sysconfig
from pathlib import Path

site = Path(sysconfig.get_paths()["purelib"])
stub = site / "tensorrt_bindings" / "tensorrt.pyi"
if not stub.is_file():
    sys.exit(f"{stub} not found: pip install --no-deps tensorrt-stubs first")
lines = stub.read_text().splitlines()


def fix_def(line: str) -> str:
    line = re.sub(r"([(,] *)in: ", r"\1in_: ", line)
    head, sep, rest = line.partition("(")
    if not head.lstrip().startswith("def ") or not sep:
        return line
    params, close, tail = rest.rpartition(") ->")
    parts, seen_default = [], False
    for p in params.split(", "):
        if "=" in p:
            seen_default = True
        elif seen_default and ":" in p and not p.strip().startswith("*"):
            p += " = ..."
        parts.append(p)
    return f"{head}({', '.join(parts)}{close}{tail}"


for _ in range(50):
    try:
        ast.parse("\n".join(lines))
        break
    except SyntaxError as err:
        i = (err.lineno or 1) - 1
        fixed = fix_def(lines[i])
        if fixed == lines[i]:
            sys.exit(f"cannot repair {stub}:{i + 1}: {lines[i]!r}")
        lines[i] = fixed
stub.write_text("\n".join(lines) + "\n")
for pkg in ("tensorrt", "tensorrt_bindings"):
    (site / pkg / "py.typed").touch()
print("tensorrt-stubs ready for mypy")
