"""`expect` lines: comparisons of sympy expressions over metric names.

Expressions are built node by node from the AST (no string is ever evaluated).
"""
from __future__ import annotations

import sympy

from circuitlang import ast, ir
from circuitlang.ast_to_ir.names import _similar

CMP_OPS = (">=", "<=", ">", "<", "==", "!=")
_FUNCTIONS = {"abs": (1, 1), "min": (2, None), "max": (2, None)}


class ExpressionResolver:
    """Expectations (a part of `_Resolver`)."""

    # -- expectations
    def _expectation(self, stmt: ast.Expect, text: str) -> ir.Expectation | None:
        lhs, rhs = self._expr(stmt.lhs), self._expr(stmt.rhs)
        if stmt.op not in CMP_OPS:
            self.report("resolve.expect", f"unknown comparison {stmt.op!r}", stmt.span,
                        "comparisons are " + ", ".join(CMP_OPS))
            return None
        if lhs is None or rhs is None:
            return None
        if not (lhs.free_symbols | rhs.free_symbols):
            self.report("resolve.expect", "this expectation names no metric, so it tests "
                        "nothing", stmt.span, "compare a metric such as recovered or "
                        f"{self.task.default_metric}")
            return None
        kind = "each" if stmt.each else "aggregate"
        return ir.Expectation(kind, lhs, stmt.op, rhs, text, span=stmt.span)

    def _expr(self, expr: ast.Expr) -> sympy.Expr | None:
        match expr:
            case ast.Number(value=value):
                num, den = value.as_integer_ratio()
                return sympy.Rational(num, den)
            case ast.Name(name=name):
                if name not in self.metric_names:
                    close = _similar(name, self.metric_names)
                    self.report("resolve.metric", f"unknown metric {name!r}", expr.span,
                                (f"did you mean {close}? " if close else "")
                                + "metrics here: " + ", ".join(self.metric_names))
                    return None
                return sympy.Symbol(name)
            case ast.Neg(operand=operand):
                inner = self._expr(operand)
                return None if inner is None else -inner
            case ast.BinOp(op=op, left=left, right=right):
                a, b = self._expr(left), self._expr(right)
                if a is None or b is None:
                    return None
                if op == "+":
                    return a + b
                if op == "-":
                    return a - b
                if op == "*":
                    return a * b
                if b == 0:
                    self.report("resolve.expect", "division by zero", expr.span,
                                "divide by a metric or a non-zero number")
                    return None
                return a / b
            case ast.Call(func=func, args=args):
                return self._call(expr, func, args)
        raise TypeError(f"not an expression: {expr!r}")  # pragma: no cover

    def _call(self, expr: ast.Call, func: str, args) -> sympy.Expr | None:
        if func not in _FUNCTIONS:
            self.report("resolve.function", f"unknown function {func!r}", expr.span,
                        "functions are abs(x), min(a, b, ...), max(a, b, ...)")
            return None
        low, high = _FUNCTIONS[func]
        if len(args) < low or (high is not None and len(args) > high):
            want = f"{low}" if low == high else f"at least {low}"
            self.report("resolve.function", f"{func} takes {want} argument"
                        f"{'s' if low != 1 or high != low else ''}, got {len(args)}",
                        expr.span, f"write {func}(x)" if func == "abs" else
                        f"write {func}(a, b)")
            return None
        values = [self._expr(a) for a in args]
        if any(v is None for v in values):
            return None
        if func == "abs":
            return sympy.Abs(values[0])
        return (sympy.Min if func == "min" else sympy.Max)(*values)

