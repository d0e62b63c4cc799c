"""Capacity planning: per-rank memory, bytes moved and time of a training run and its fill,
for the ``items`` and ``grid`` layouts, from the problem's sizes and a small device profile.

- :mod:`svdfill.plan.profile`: :class:`DeviceProfile` (documented defaults for an H100 and a
  CPU) and :func:`calibrate` (measures this machine).
- :mod:`svdfill.plan.estimate`: pure functions from a :class:`Problem` and a profile to an
  :class:`Estimate` per layout, and the side-by-side table ``svdfill plan`` prints.
"""
