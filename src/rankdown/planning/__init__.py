"""Planning: rank policies, the :class:`~rankdown.planning.plan.Plan` every planner returns,
global budgets spent by measured sensitivity, latency-aware plans, and ``compress`` (select
layers, choose ranks, factorize, swap)."""
