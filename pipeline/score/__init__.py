"""The score job: predictions + ground truth -> metrics and a report.

Read in this order: ``masks`` (RLE columns -> decoded mask sets), ``metrics`` (pure per-expression scores and
mergeable totals), ``cases`` (example picking), ``blocks`` (one Ray Data block -> partial stats), ``graph`` (the
Ray Data job), ``report`` and ``plots`` (metrics.json/md and pictures).
"""
