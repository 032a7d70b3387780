"""The review station: a person corrects the machine's calls, signs the differential, exports.

* :mod:`~leukoscope.review.labels`: the 15 classes + 3 review outcomes and their keys.
* :mod:`~leukoscope.review.schema`: the versioned SQLite database (WAL, ``synchronous=FULL``).
* :mod:`~leukoscope.review.importer`: a ``screen`` output or ``predict`` table into a new database
  (native-resolution crops cut from the original smears, field overviews).
* :mod:`~leukoscope.review.store`: :class:`ReviewStore`, the review as a library object.
* :mod:`~leukoscope.review.export`: the signed differential (CSV, JSON, printable HTML) and the
  reviewed cells as a labelled dataset.
* :mod:`~leukoscope.review.model_views`: model input and saliency of a cell (the one module that
  touches a model).
* :mod:`~leukoscope.review.app`: the FastAPI web station over a store.
"""

from leukoscope.review.export import export_differential, export_labels
from leukoscope.review.importer import ReviewInputError, build_database
from leukoscope.review.schema import ReviewDatabaseError
from leukoscope.review.store import ConflictError, ReadOnlyError, ReviewStore, SignOffError

__all__ = ["ConflictError", "ReadOnlyError", "ReviewDatabaseError", "ReviewInputError", "ReviewStore", "SignOffError",
           "build_database", "export_differential", "export_labels"]
