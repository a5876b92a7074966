import jax
import pytest

# issue 16: the code must not rely on implicit dtype promotion (int32 + float32 arrays,
# float32 + float64 arrays, ...), so the whole test session runs with JAX's strict promotion;
# Python scalars stay weakly typed. Production runs use JAX's standard promotion, so every
# fix is an explicit cast to the dtype standard promotion gives: the same numbers there.
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    counter = iter(range(10**6))
    return lambda: jax.random.key(next(counter))


@pytest.fixture
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


# test helper modules (e.g. tests/data/io_helpers.py) are imported by their siblings by name;
# with --import-mode=importlib their folders are not on sys.path by themselves
import pathlib  # noqa: E402
import sys  # noqa: E402

for _d in sorted(
    p
    for p in pathlib.Path(__file__).parent.iterdir()
    if p.is_dir() and not p.name.startswith((".", "_"))
):
    if str(_d) not in sys.path:
        sys.path.insert(0, str(_d))
