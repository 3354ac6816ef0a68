"""Package layout that pyproject.toml cannot express on its own.

`grammar/` and `stdlib/` live at the top of the repository (they are the language's
source of truth, edited by people), and must still ship inside the wheel. They are
mapped to the packages `circuitlang._grammar` and `circuitlang._stdlib`.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["circuitlang", "circuitlang.*"])
    + ["circuitlang._grammar", "circuitlang._stdlib"],
    package_dir={
        "circuitlang._grammar": "grammar",
        "circuitlang._stdlib": "stdlib",
    },
    package_data={
        "circuitlang._grammar": ["*.lark"],
        "circuitlang._stdlib": ["*.circ"],
        "circuitlang.models": ["toys/*/*.json", "toys/*/*.safetensors", "toys/*/*.txt"],
    },
)
