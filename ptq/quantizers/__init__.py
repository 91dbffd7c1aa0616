"""Quantizers (techniques): FP32 ONNX + calibration batches -> a QDQ ONNX and its record; backends run the result.

`ort` is the backend's own INT8 path (ONNX Runtime's static quantizer; on TensorRT its calibrator or ONNX Runtime's
Q/DQ laid out for it), set by the backend's options. The others are toolkits (NNCF, AMD Quark, AIMET), each with its
own Options, run in a process of their own, in an environment of their own where their pins conflict with ptq's
(`ptq.quantizers.toolkit`). Importing this package costs neither torch, ONNX Runtime nor any toolkit.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Tuple, Type

from ptq.errors import PtqError
from ptq.options import NoOptions, parse_options, user_options

BUILT_IN = "ort"  # the backend's own INT8 quantization
QUANTIZERS = {BUILT_IN: "", "nncf": "ptq.quantizers.nncf", "quark": "ptq.quantizers.quark", "aimet": "ptq.quantizers.aimet"}


def options_class(name: str) -> Type[Any]:
    """The Options dataclass of a quantizer (the `ort` quantizer's settings are its backend's: NoOptions here)."""
    if name not in QUANTIZERS:
        raise PtqError(f"unknown quantizer {name!r}: use one of {', '.join(QUANTIZERS)}")
    if name == BUILT_IN:
        return NoOptions
    cls: Type[Any] = importlib.import_module(QUANTIZERS[name]).Options
    return cls


def option_names(name: str) -> set[str]:
    """The names of the options a user sets for this quantizer."""
    return {f.name for f in user_options(options_class(name))}


def options(name: str, given: Dict[str, str]) -> Any:
    """This quantizer's options from the strings given (all of them its own), validated."""
    return parse_options(options_class(name), given)


def parse_spec(spec: str) -> Tuple[str, Dict[str, str]]:
    """A sweep's quantizer spec `name[+option[=value]]...` (a bare option is `=true`), e.g. `quark+adaround+iterations=50`;
    `ort+per_channel=false` sets the backend's own INT8 settings, which the run's backend checks."""
    name, *parts = [p.strip() for p in spec.split("+")]
    options_class(name)
    given: Dict[str, str] = {}
    for part in parts:
        key, _, value = part.partition("=")
        if name != BUILT_IN and key not in option_names(name):
            raise PtqError(f"{spec!r}: quantizer {name} has no option {key!r}: use {', '.join(sorted(option_names(name))) or 'none'}")
        given[key] = value if _ else "true"
    return name, given
