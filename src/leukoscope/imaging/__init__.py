"""Pixels in, pixels out: image loading (:mod:`.images`), physical scale and the one scale policy
(:mod:`.scale`), the red-cell scale estimate (:mod:`.scale_estimate`), colour — white balance and
stain normalisation (:mod:`.colour`) — and the morphology helpers shared by leukocyte detection and
the scale estimate (:mod:`.morphology`). Nothing here knows about models."""
