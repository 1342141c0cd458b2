"""Vectorizable exp, erf and softmax for CPU targets (used by the `legalize` pass).

LLVM lowers a vector `exp`/`erf` to one libm call per lane: in all-MiniLM-L6-v2 at sequence 128
the softmax's exps and GELU's erfs took most of the time once the matmuls were tiled. Here they are
plain arithmetic that vectorizes:

    exp(x) = 2^n * p(r),  n = round(x / ln 2),  r = x - n ln 2 (ln 2 in two parts, so r is exact),
             p a degree-7 polynomial (Cephes' expf coefficients), 2^n built in the exponent bits;
             x clamped to [-87.3, 88]; below -87.3 the result is 0 (exp's true value there is
             under the smallest normal float: returning that float instead, as an earlier version
             did, fed denormals into attention's masked softmax and the matmul after it, which Intel
             cores run about 100x slower: MiniLM with a padded mask 87 ms -> 19 ms on a Xeon)
    erf(x) = sign(x) (1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-x^2)),  t = 1 / (1 + p |x|)
             (Abramowitz & Stegun 7.1.26: absolute error under 1.5e-7; 4.7e-7 measured in float32)

Relative error of exp about 2e-7 (a few float32 ulps); both far inside verify's 1e-4. Targets
whose vector unit takes no float math (Hexagon under qemu) keep the libm calls.
"""

from __future__ import annotations

from typing import Any

EXP_LOW, EXP_HIGH = -87.33654, 88.0  # 2^n stays a normal float32 with n in [-126, 127]
LOG2_E = 1.4426950408889634
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4  # ln 2 = high + low; high has few bits, so n * high is exact
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
ERF_P = 0.3275911
ERF_POLY = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)  # a5 .. a1


def _f32(value: float) -> Any:
    from tvm import tirx

    return tirx.const(value, "float32")


def fast_exp(x: Any) -> Any:
    """exp of a float32 TIR expression as vectorizable arithmetic."""
    from tvm import tirx

    underflows = x < _f32(EXP_LOW)
    x = tirx.max(tirx.min(x, _f32(EXP_HIGH)), _f32(EXP_LOW))
    n = tirx.floor(x * _f32(LOG2_E) + _f32(0.5))
    r = x - n * _f32(LN2_HIGH) - n * _f32(LN2_LOW)
    poly = _f32(EXP_POLY[0])
    for coefficient in EXP_POLY[1:]:
        poly = poly * r + _f32(coefficient)
    p = poly * (r * r) + r + _f32(1.0)
    two_to_n = tirx.reinterpret("float32", (tirx.Cast("int32", n) + tirx.const(127, "int32")) << tirx.const(23, "int32"))
    return tirx.Select(underflows, _f32(0.0), p * two_to_n)


def fast_erf(x: Any) -> Any:
    """erf of a float32 TIR expression as vectorizable arithmetic (one fast_exp)."""
    from tvm import tirx

    a = tirx.abs(x)
    t = _f32(1.0) / (_f32(1.0) + _f32(ERF_P) * a)
    poly = _f32(ERF_POLY[0])
    for coefficient in ERF_POLY[1:]:
        poly = poly * t + _f32(coefficient)
    y = _f32(1.0) - poly * t * fast_exp(-(a * a))
    return tirx.Select(x < _f32(0.0), -y, y)


def _elementwise(name: str, function: Any) -> Any:
    def legalize(bb: Any, call: Any) -> Any:
        from tvm import te

        return bb.call_te(lambda x: te.compute(x.shape, lambda *i: function(x(*i)), name=name), call.args[0], primfunc_name_hint=name)

    return legalize


def _softmax(bb: Any, call: Any) -> Any:
    """softmax along one axis in TOPI's four stages (max, exp, sum, normalize), exp as fast_exp."""
    from tvm import te

    def compute(x: Any) -> Any:
        rank = len(x.shape)
        axis = int(call.attrs.axis) % rank
        k = te.reduce_axis((0, x.shape[axis]), name="k")

        def at(index: tuple[Any, ...], value: Any) -> tuple[Any, ...]:
            return (*index[:axis], value, *index[axis:])

        maxelem = te.compute([d for i, d in enumerate(x.shape) if i != axis], lambda *i: te.max(x(*at(i, k)), axis=k), name="T_softmax_maxelem")
        exp = te.compute(x.shape, lambda *i: fast_exp(x(*i) - maxelem(*(i[:axis] + i[axis + 1:]))), name="T_softmax_exp")
        k2 = te.reduce_axis((0, x.shape[axis]), name="k")
        expsum = te.compute(maxelem.shape, lambda *i: te.sum(exp(*at(i, k2)), axis=k2), name="T_softmax_expsum")
        return te.compute(x.shape, lambda *i: exp(*i) / expsum(*(i[:axis] + i[axis + 1:])), name="T_softmax_norm")

    return bb.call_te(compute, call.args[0], primfunc_name_hint="softmax")


def legalize_map(counts: dict[str, int]) -> dict[str, Any]:
    """Custom legalizations of exp, erf and softmax for LegalizeOps: float32 calls take the fast
    versions, each counted in `counts` by op; other dtypes keep TVM's own legalization."""
    rules = {"relax.exp": _elementwise("exp", fast_exp), "relax.erf": _elementwise("erf", fast_erf), "relax.nn.softmax": _softmax}

    def counted(name: str, rule: Any) -> Any:
        def legalize(bb: Any, call: Any) -> Any:
            if str(call.args[0].ty.dtype) != "float32":
                return call.op.get_attr("FLegalize")(bb, call)
            counts[name] = counts.get(name, 0) + 1
            return rule(bb, call)

        return legalize

    return {name: counted(name, rule) for name, rule in rules.items()}
