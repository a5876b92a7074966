"""Rotations and poses in the RELION convention.

RELION stores ZYZ Euler angles (rot, tilt, psi) in degrees. The matrix
``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` (RELION's ``Euler_angles2matrix``) rotates the
reference into the particle frame: an atom at ``r`` in the reference projects to
``(A @ r)[:2]`` in the image. Quaternions are ``(w, x, y, z)`` with ``w >= 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


def _euler_matrix(xp, a, b, g):
    """RELION's ``Euler_angles2matrix`` for angles in radians, in the array module ``xp``."""
    ca, sa, cb, sb, cg, sg = xp.cos(a), xp.sin(a), xp.cos(b), xp.sin(b), xp.cos(g), xp.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    row0 = xp.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], axis=-1)
    row1 = xp.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], axis=-1)
    row2 = xp.stack([sc, ss, cb], axis=-1)
    return xp.stack([row0, row1, row2], axis=-2)


def euler_to_matrix(
    rot_in_degrees: Float[Array, "*batch"],
    tilt_in_degrees: Float[Array, "*batch"],
    psi_in_degrees: Float[Array, "*batch"],
) -> Float[Array, "*batch 3 3"]:
    """RELION ZYZ Euler angles (degrees) to the rotation matrix ``A``."""
    angles = (rot_in_degrees, tilt_in_degrees, psi_in_degrees)
    return _euler_matrix(jnp, *(jnp.deg2rad(jnp.asarray(x)) for x in angles))


def euler_to_matrix_np(rot, tilt, psi) -> np.ndarray:
    """:func:`euler_to_matrix` in float64 NumPy (the readers convert millions of poses on the
    host)."""
    return _euler_matrix(np, *(np.deg2rad(np.asarray(x, np.float64)) for x in (rot, tilt, psi)))


def matrix_to_euler(
    matrix: Float[np.ndarray, "*batch 3 3"],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation matrix to RELION (rot, tilt, psi) in degrees (RELION's ``Euler_matrix2angles``).

    Returns tilt in [0, 180] and rot, psi in (-180, 180]. NumPy (used by the I/O layer).
    """
    A = np.asarray(matrix, dtype=np.float64)
    abs_sb = np.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    gamma = np.arctan2(A[..., 1, 2], -A[..., 0, 2])
    alpha = np.arctan2(A[..., 2, 1], A[..., 2, 0])
    sin_g = np.sin(gamma)
    sign_sb = np.where(
        np.abs(sin_g) < np.finfo(np.float32).eps,
        np.sign(-A[..., 0, 2] / np.where(np.cos(gamma) == 0, 1.0, np.cos(gamma))),
        np.where(sin_g > 0, np.sign(A[..., 1, 2]), -np.sign(A[..., 1, 2])),
    )
    beta = np.arctan2(sign_sb * abs_sb, A[..., 2, 2])
    # gimbal lock: tilt = 0 or 180
    up = A[..., 2, 2] > 0
    gamma_d = np.where(
        up, np.arctan2(-A[..., 1, 0], A[..., 0, 0]), np.arctan2(A[..., 1, 0], -A[..., 0, 0])
    )
    alpha = np.where(regular, alpha, 0.0)
    beta = np.where(regular, beta, np.where(up, 0.0, np.pi))
    gamma = np.where(regular, gamma, gamma_d)
    return np.rad2deg(alpha), np.rad2deg(beta), np.rad2deg(gamma)


def quaternion_to_matrix(q: Float[Array, "*batch 4"]) -> Float[Array, "*batch 3 3"]:
    """Unit quaternion ``(w, x, y, z)`` to the active rotation matrix."""
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return jnp.stack(
        [
            jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            jnp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            jnp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=-2,
    )


def matrix_to_quaternion(matrix: Float[np.ndarray, "*batch 3 3"]) -> np.ndarray:
    """Rotation matrix to a unit quaternion ``(w, x, y, z)`` with ``w >= 0`` (NumPy)."""
    R = np.asarray(matrix, dtype=np.float64)
    m = R.reshape(-1, 3, 3)
    out = np.empty((m.shape[0], 4))
    for n, M in enumerate(m):
        t = np.trace(M)
        if t > 0:
            s = 2.0 * np.sqrt(1.0 + t)
            out[n] = [
                0.25 * s,
                (M[2, 1] - M[1, 2]) / s,
                (M[0, 2] - M[2, 0]) / s,
                (M[1, 0] - M[0, 1]) / s,
            ]
        else:
            i = int(np.argmax(np.diag(M)))
            j, k = (i + 1) % 3, (i + 2) % 3
            s = 2.0 * np.sqrt(1.0 + M[i, i] - M[j, j] - M[k, k])
            v = np.empty(3)
            v[i] = 0.25 * s
            v[j] = (M[j, i] + M[i, j]) / s
            v[k] = (M[k, i] + M[i, k]) / s
            out[n] = [(M[k, j] - M[j, k]) / s, *v]
    out *= np.where(out[:, :1] < 0, -1.0, 1.0)
    return out.reshape(R.shape[:-2] + (4,))


def axis_angle_to_matrix(rotvec: Float[Array, "*batch 3"]) -> Float[Array, "*batch 3 3"]:
    """Rotation vector (axis * angle, radians; cryoSPARC's ``alignments3D/pose``) to a matrix."""
    rotvec = jnp.asarray(rotvec)
    theta = jnp.linalg.norm(rotvec, axis=-1, keepdims=True)
    safe = jnp.where(theta > 1e-12, theta, 1.0)
    axis = rotvec / safe
    half = 0.5 * theta
    q = jnp.concatenate([jnp.cos(half), axis * jnp.sin(half)], axis=-1)
    q = jnp.where(theta > 1e-12, q, jnp.array([1.0, 0.0, 0.0, 0.0], dtype=q.dtype))
    return quaternion_to_matrix(q)


def axis_angle_to_matrix_np(rotvec) -> np.ndarray:
    """:func:`axis_angle_to_matrix` in float64 NumPy (Rodrigues' formula; the ``.cs`` reader)."""
    v = np.asarray(rotvec, np.float64)
    theta = np.linalg.norm(v, axis=-1)[..., None, None]
    kx, ky, kz = np.moveaxis(v / np.where(theta[..., 0] > 1e-12, theta[..., 0], 1.0), -1, 0)
    zero = np.zeros_like(kx)
    K = np.stack([np.stack(r, -1) for r in ((zero, -kz, ky), (kz, zero, -kx), (-ky, kx, zero))], -2)
    return np.eye(3) + np.sin(theta) * K + (1.0 - np.cos(theta)) * (K @ K)


def matrix_to_axis_angle(matrix: Float[np.ndarray, "*batch 3 3"]) -> np.ndarray:
    """Rotation matrix to a rotation vector (radians), NumPy."""
    q = matrix_to_quaternion(matrix)
    w = np.clip(q[..., 0], -1.0, 1.0)
    angle = 2.0 * np.arccos(w)
    s = np.sqrt(np.maximum(1.0 - w * w, 0.0))
    axis = np.where(s[..., None] > 1e-12, q[..., 1:] / np.where(s > 1e-12, s, 1.0)[..., None], 0.0)
    return axis * angle[..., None]


def sample_uniform_rotations(key: PRNGKeyArray, n: int) -> Float[Array, "n 3 3"]:
    """Haar-uniform rotations on SO(3) (normalised Gaussian quaternions)."""
    q = jax.random.normal(key, (n, 4))
    return quaternion_to_matrix(q)
