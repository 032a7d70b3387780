"""LeukoScope: white-blood-cell morphology recognition and AML blast screening.

Research software after Matek et al., *Human-level recognition of blast cells in
acute myeloid leukaemia with convolutional neural networks* (Nat. Mach. Intell. 2019).
Not for diagnostic use.
"""

__version__ = "0.1.0"

INTENDED_USE = (
    "Research use only. Not a medical device and not for diagnostic use: every "
    "result must be reviewed by a qualified haematologist."
)
