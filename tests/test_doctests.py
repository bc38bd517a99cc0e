"""Every docstring example in the package runs and prints what it says (docs that cannot rot)."""
import doctest
import importlib
import pkgutil

import pytest

import streamtta

MODULES = sorted(m.name for m in pkgutil.walk_packages(streamtta.__path__, prefix="streamtta."))


def test_modules_were_found():
    assert "streamtta.adapters" in MODULES and "streamtta.detectors.shift.monitor" in MODULES and len(MODULES) > 40


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=dict(vars(module))):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see the output above)"
