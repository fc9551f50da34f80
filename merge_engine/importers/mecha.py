"""sd-mecha's `.mecha` recipe text -> a native recipe.

`mecha_text` reads the text (sd-mecha's serializer's format 0.1.0) into numbered instructions;
the last one is the recipe. Parameters come as literals: `dict key=0.3` wrapped in a
`singleton-mecha` literal and `convert_singleton`, and block weights as a
`sd1-/sdxl-supermerger_blocks` literal passed through `convert_sd1_blocks_to_ldm` /
`convert_sdxl_blocks_to_sgm`, which become block maps placed as sd-mecha places them.

sd-mecha works in two spaces, models ("weight") and differences ("delta"); each method is
mapped by what it computes: `subtract` makes a delta, `add_difference(a, delta, alpha)` adds one,
so `add_difference(a, subtract(b, c))` is sdmerge's add_difference and `add_difference(base,
ties_sum(subtract(m, base)...))` its ties. A shape sdmerge has no method for is refused, and so is
sd-mecha's model stock (`model_stock`, and `ties_sum_extended` / `ties_sum_with_dropout` with
`apply_stock` false, which is when its code applies it): its cosine is taken per row over
consecutive pairs of models, sdmerge's per tensor over all pairs, so the merges differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..recipe import parse_recipe
from . import Imported, exact_number
from .mecha_text import Line, Number, Ref, parse_lines

STOCK_DIFFERS = ("{what}: sd-mecha's model stock takes its cosine per row of a tensor over consecutive pairs of "
                 "models, sdmerge's per tensor over all pairs (docs/METHODS.md): not the same merge")
# Model configs whose keys are the original LDM/SGM checkpoint names sdmerge reads; configs of
# other key formats (kohya, diffusers, LoRA) or architectures sdmerge lacks are refused.
NATIVE_CONFIGS = {"sd1-ldm", "sdxl-sgm"}
FOREIGN_CONFIG_WORDS = ("kohya", "diffusers", "lora", "lycoris", "flux", "sd3", "blocks", "singleton")
BLOCK_CONVERSIONS = {"convert_sd1_blocks_to_ldm": ("sd1-supermerger_blocks", {"TIME_EMBED": "BASE", "OUT": "OUT11",
                                                                            "VAE": "BASE"}),
                     "convert_sdxl_blocks_to_sgm": ("sdxl-supermerger_blocks", {"TIME_EMBED": "BASE",
                                                                              "LABEL_EMB": "BASE", "OUT": "OUT08"})}

# sd-mecha 1.1.8's signatures: positional parameters (with defaults where optional), the name of
# the variadic one, keyword-only parameters with defaults.
_MISSING = object()
SIGNATURES: dict[str, tuple[tuple[tuple[str, Any], ...], str | None, dict[str, Any]]] = {
    "weighted_sum": ((("a", _MISSING), ("b", _MISSING), ("alpha", 0.5)), None, {}),
    "slerp": ((("a", _MISSING), ("b", _MISSING), ("alpha", 0.5)), None, {}),
    "add_difference": ((("a", _MISSING), ("b", _MISSING), ("alpha", 1.0)), None, {}),
    "subtract": ((("a", _MISSING), ("b", _MISSING)), None, {}),
    "scale": ((("a", _MISSING), ("alpha", 1.0)), None, {}),
    "n_average": ((), "models", {}),
    "geometric_median": ((), "models", {"eps": 1e-6, "maxiter": 100, "ftol": 1e-20}),
    "model_stock": ((), "deltas", {"cos_eps": 1e-6}),
    "ties_sum": ((), "models", {"k": 1.0, "vote_sgn": False}),
    "ties_sum_extended": ((), "models", {"k": 0.2, "vote_sgn": False, "apply_stock": False, "apply_median": False,
                                         "cos_eps": 1e-6, "eps": 1e-6, "maxiter": 100, "ftol": 1e-20}),
    "ties_sum_with_dropout": ((), "deltas", {"probability": 0.9, "della_eps": 0.0, "rescale": True, "k": 0.2,
                                             "vote_sgn": False, "apply_stock": False, "cos_eps": 1e-6,
                                             "apply_median": False, "eps": 1e-6, "maxiter": 100, "ftol": 1e-20,
                                             "seed": None}),
}



# -- converting ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Delta:
    """A value in sd-mecha's delta space: `models[i] - base` for each i (one for `subtract`), and
    how they are combined (`kind`: diff, ties, median) with the method's parameters."""

    kind: str
    base: Any
    models: tuple[Any, ...]
    params: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Param:
    value: Any  # a float, bool, int, None, or a block map (dict)


@dataclass(frozen=True)
class Literal:
    config: str | None
    value: Any


class _Converter:
    def __init__(self, lines: list[Line]):
        self.lines = lines
        self.results: list[Any] = []
        self.notes: list[str] = []

    def run(self) -> Any:
        for line in self.lines:
            self.results.append(self.instruction(line))
        return self.results[-1]

    def get(self, value: Any) -> Any:
        return self.results[value] if isinstance(value, Ref) else value

    def instruction(self, line: Line) -> Any:
        if line.command == "model":
            return self.model(line)
        if line.command == "dict":
            if line.args:
                raise line.error("takes only KEY=VALUE items")
            return {k: self.get(v) for k, v in line.kwargs.items()}
        if line.command == "literal":
            return self.literal(line)
        if line.command == "merge":
            if not line.args or not isinstance(line.args[0], str):
                raise line.error("expects a quoted method name first")
            return self.merge(line, line.args[0])
        raise line.error(f"unknown instruction {line.command!r} (sd-mecha writes model, dict, literal and merge)")

    def model(self, line: Line) -> str:
        names = ("path", "model_config", "merge_space")
        if len(line.args) > 3 or set(line.kwargs) - set(names):
            raise line.error("takes a path, model_config and merge_space")
        given = {**dict(zip(names, line.args, strict=False)), **line.kwargs}
        path, config, space = given.get("path"), given.get("model_config"), given.get("merge_space")
        if not isinstance(path, str) or not path:
            raise line.error("the model path must be a quoted string")
        if space not in (None, "weight"):
            raise line.error(f"the model {path!r} is in merge space {space!r}: sdmerge reads checkpoints (weight "
                             "space) only", model=path)
        if isinstance(config, str) and config not in NATIVE_CONFIGS:
            if any(word in config for word in FOREIGN_CONFIG_WORDS):
                raise line.error(f"the model {path!r} has model_config {config!r}: sdmerge reads original "
                                 "SD1/SD2/SDXL checkpoint keys (sd1-ldm, sdxl-sgm) only", model=path)
            self.notes.append(f"line {line.number}: model_config {config!r} is not one of sd-mecha's own; "
                              "sdmerge reads the file's architecture from its keys")
        return path

    def literal(self, line: Line) -> Literal:
        names = ("value", "model_config", "merge_space")
        if len(line.args) > 3 or set(line.kwargs) - set(names):
            raise line.error("takes a value, model_config and merge_space")
        given = {**dict(zip(names, line.args, strict=False)), **line.kwargs}
        config = given.get("model_config")
        value = self.get(given.get("value"))
        if config is not None and config != "singleton-mecha" and not str(config).endswith("supermerger_blocks"):
            raise line.error(f"a literal in model_config {config!r} sets values per key, which no sdmerge "
                             "parameter holds (block maps come from sd1-/sdxl-supermerger_blocks literals)")
        return Literal(config, value)

    # -- merges -----------------------------------------------------------------------------

    def bind(self, line: Line, method: str) -> dict[str, Any]:
        positional, variadic, keywords = SIGNATURES[method]
        args = [self.get(a) for a in line.args[1:]]
        bound: dict[str, Any] = {}
        for (name, _), value in zip(positional, args, strict=False):
            bound[name] = value
        rest = args[len(positional):]
        if rest and variadic is None:
            raise line.error(f"{method} takes {len(positional)} arguments, not {len(args)}")
        if variadic:
            if not rest:
                raise line.error(f"{method} needs at least one model")
            bound[variadic] = rest
        for name, value in line.kwargs.items():
            if name in bound or (name not in keywords and name not in dict(positional)):
                problem = "given twice" if name in bound else f"is not a parameter sdmerge maps for {method}"
                raise line.error(f"{name} {problem}", parameter=name)
            bound[name] = self.get(value)
        for name, default in (*positional, *keywords.items()):
            if name not in bound:
                if default is _MISSING:
                    raise line.error(f"{method} misses its argument {name}", parameter=name)
                bound[name] = default
        return bound

    def merge(self, line: Line, method: str) -> Any:
        if method in BLOCK_CONVERSIONS:
            return self.blocks(line, method)
        if method == "convert_singleton":
            if len(line.args) != 2 or line.kwargs:
                raise line.error("convert_singleton takes one literal")
            value = self.get(line.args[1])
            if not (isinstance(value, Literal) and value.config == "singleton-mecha" and isinstance(value.value, dict)
                    and set(value.value) == {"key"}):
                raise line.error("convert_singleton expects a singleton-mecha literal of dict key=VALUE")
            return Param(value.value["key"])
        if method not in SIGNATURES:
            what = "a model conversion" if method.startswith("convert_") else "a method"
            raise line.error(f"{what} sdmerge cannot run exactly: {method!r} (it maps weighted_sum, add_difference, "
                             f"subtract, scale, n_average, slerp, geometric_median and the ties_sum family)", method=method)
        p = self.bind(line, method)
        return getattr(self, f"_{method}")(line, p)

    def blocks(self, line: Line, method: str) -> Param:
        config, placed = BLOCK_CONVERSIONS[method]
        value = self.get(line.args[1]) if len(line.args) == 2 and not line.kwargs else None
        if not (isinstance(value, Literal) and value.config == config and isinstance(value.value, dict)):
            raise line.error(f"{method} expects a {config} literal of block values")
        blocks: dict[str, float] = {}
        for name, number in value.value.items():
            blocks[name] = self.number(line, number, f"block {name}")
        blocks.update({target: blocks[source] for target, source in placed.items() if source in blocks})
        return Param({"blocks": blocks})

    # -- parameters and sources -----------------------------------------------------------------

    def number(self, line: Line, value: Any, name: str) -> float | dict:
        if isinstance(value, Param):
            value = value.value
        if isinstance(value, dict) and "blocks" in value:
            return value
        if isinstance(value, Number):
            return exact_number(value.text, f".mecha line {line.number}: {name}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise line.error(f"{name} must be a number, not {value!r}", parameter=name)
        return float(value)

    def flag(self, line: Line, value: Any, name: str) -> Any:
        value = value.value if isinstance(value, Param) else value
        if isinstance(value, Number):
            value = value.value
        return value

    def model_space(self, line: Line, value: Any, name: str) -> Any:
        if isinstance(value, Delta):
            raise line.error(f"{name} is a difference (sd-mecha's delta space) where a model is expected",
                             parameter=name)
        if not isinstance(value, str | dict) or (isinstance(value, dict) and "method" not in value):
            raise line.error(f"{name} must be a model or a merge of models, not {type(value).__name__}",
                             parameter=name)
        return value

    def deltas(self, line: Line, values: list[Any], name: str) -> tuple[Any, tuple[Any, ...]]:
        """Deltas `m_i - base` over one base: (base, (m_1, ...))."""
        if not all(isinstance(v, Delta) and v.kind == "diff" for v in values):
            raise line.error(f"{name}: sdmerge merges task vectors written as subtract(model, base); these "
                             "are other differences", parameter=name)
        bases = {_key(v.base) for v in values}
        if len(bases) != 1:
            raise line.error(f"{name}: the task vectors are taken over different bases", parameter=name)
        return values[0].base, tuple(v.models[0] for v in values)

    # -- one method each ------------------------------------------------------------------------

    def _weighted_sum(self, line: Line, p: dict[str, Any]) -> dict:
        return {"method": "weighted_sum", "a": self.model_space(line, p["a"], "a"),
                "b": self.model_space(line, p["b"], "b"), "alpha": self.number(line, p["alpha"], "alpha")}

    def _slerp(self, line: Line, p: dict[str, Any]) -> dict:
        return {**self._weighted_sum(line, p), "method": "slerp"}

    def _n_average(self, line: Line, p: dict[str, Any]) -> dict:
        return {"method": "uniform", "models": [self.model_space(line, m, "models") for m in p["models"]]}

    def _scale(self, line: Line, p: dict[str, Any]) -> dict:
        return {"method": "weighted", "normalize": False,
                "models": [{"model": self.model_space(line, p["a"], "a"),
                            "weight": self.number(line, p["alpha"], "alpha")}]}

    def _subtract(self, line: Line, p: dict[str, Any]) -> Delta:
        return Delta("diff", self.model_space(line, p["b"], "b"), (self.model_space(line, p["a"], "a"),))

    def _geometric_median(self, line: Line, p: dict[str, Any]) -> Any:
        params = {"eps": self.number(line, p["eps"], "eps"), "maxiter": self.flag(line, p["maxiter"], "maxiter"),
                  "ftol": self.number(line, p["ftol"], "ftol")}
        if all(isinstance(m, Delta) for m in p["models"]):
            base, models = self.deltas(line, p["models"], "models")
            return Delta("median", base, models, tuple(params.items()))
        return {"method": "geometric_median", "models": [self.model_space(line, m, "models") for m in p["models"]],
                **params}

    def _model_stock(self, line: Line, p: dict[str, Any]) -> Delta:
        raise line.error(STOCK_DIFFERS.format(what="model_stock"))

    def _ties_sum(self, line: Line, p: dict[str, Any], variadic: str = "models", method: str = "ties_sum") -> Delta:
        base, models = self.deltas(line, p[variadic], variadic)
        params = {name: (self.number(line, v, name) if name in ("k", "cos_eps", "eps", "ftol", "probability",
                                                                  "della_eps") else self.flag(line, v, name))
                  for name, v in p.items() if name != variadic}
        if "apply_stock" in params:  # ties_sum_extended and ties_sum_with_dropout
            if not params["apply_median"] and not params["apply_stock"]:
                # sd-mecha's line: t = 1.0 if apply_stock else get_model_stock_t(...)
                raise line.error(STOCK_DIFFERS.format(what=f"{method} with apply_stock false (sd-mecha then applies "
                                                           "model stock; true gives the plain TIES sum)"),
                                 parameter="apply_stock")
            params["apply_stock"] = False  # with apply_median sd-mecha takes the median, stock or not
        if "seed" in params and params["seed"] is None:
            raise line.error("ties_sum_with_dropout has no seed: sd-mecha then draws a different mask on every "
                             "run, which no recipe can reproduce", parameter="seed")
        return Delta("ties", base, models, tuple(params.items()))

    def _ties_sum_extended(self, line: Line, p: dict[str, Any]) -> Delta:
        return self._ties_sum(line, p, method="ties_sum_extended")

    def _ties_sum_with_dropout(self, line: Line, p: dict[str, Any]) -> Delta:
        self.notes.append(f"line {line.number}: dropout keeps each element with the same probability as "
                          "sd-mecha's, from sdmerge's own counter-based draws (docs/METHODS.md): the mask, "
                          "and so the tensors, differ from sd-mecha's for the same seed")
        return self._ties_sum(line, p, "deltas", "ties_sum_with_dropout")

    def _add_difference(self, line: Line, p: dict[str, Any]) -> dict:
        a, delta, alpha = self.model_space(line, p["a"], "a"), p["b"], self.number(line, p["alpha"], "alpha")
        if not isinstance(delta, Delta):
            raise line.error("add_difference adds a difference (sd-mecha's delta space: subtract, ties_sum, ...) "
                             "to a model; its b is a model", parameter="b")
        if delta.kind == "diff":
            return {"method": "add_difference", "a": a, "b": delta.models[0], "c": delta.base, "alpha": alpha}
        if _key(delta.base) != _key(a):
            raise line.error(f"the task vectors of {delta.kind} are taken over another base than the model they "
                             "are added to; sdmerge's methods add them to their own base", parameter="a")
        params = dict(delta.params)
        if delta.kind == "ties":
            return {"method": "ties", "base": a, "models": list(delta.models), "alpha": alpha, **params}
        return {"method": "geometric_median", "base": a, "models": list(delta.models), "alpha": alpha, **params}


def _key(source: Any) -> str:
    return json.dumps(source, sort_keys=True)


def convert_mecha(text: str) -> Imported:
    """A `.mecha` text -> an `Imported` native recipe; every refusal names its line."""
    converter = _Converter(parse_lines(text))
    result = converter.run()
    last = converter.lines[-1]
    if isinstance(result, Delta):
        raise last.error("the recipe's result is a difference (sd-mecha's delta space), not a model")
    if isinstance(result, Param | Literal) or isinstance(result, dict) and "method" not in result:
        raise last.error("the recipe's last instruction is a value, not a model or a merge")
    recipe = parse_recipe({"merge": result, "output": {"dtype": "fp16"}})
    return Imported(recipe, "mecha", tuple(converter.notes))
