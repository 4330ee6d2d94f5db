"""Choosing workers x memory for a deadline, a budget, or speed (SMLT paper §3.2, DESIGN §5).

One job per module, lowest first:

- :mod:`~smlt.optimizer.cost`: prices (the one table the backends and the scheduler use too),
  :class:`~smlt.optimizer.cost.CostModel`, :class:`~smlt.optimizer.cost.CostBreakdown`;
- :mod:`~smlt.optimizer.goals`: ``Deadline``, ``Budget``, ``Fastest``, ``Override`` and the
  parsers of ``--deadline 30m`` and ``--budget 0.50``;
- :mod:`~smlt.optimizer.perf` and :mod:`~smlt.optimizer.memory`: the physical model of an
  iteration's time and of a worker's memory, fitted to trials;
- :mod:`~smlt.optimizer.space`, :mod:`~smlt.optimizer.problem`, :mod:`~smlt.optimizer.economics`:
  the candidates, the decision's inputs and outputs, time and money as functions of s/iteration;
- :mod:`~smlt.optimizer.bayes`: ``plan``, ``replan``, ``search`` (scikit-optimize GP + EI).

Nothing is imported here on purpose: the backends import :mod:`~smlt.optimizer.cost` for their
prices and should not pay for importing scikit-optimize (seconds) to get them.
"""
