import jax
import pytest



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
