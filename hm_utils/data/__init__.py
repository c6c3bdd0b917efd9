"""Medical data sets normalised to one instruction schema, split deterministically.

Later stages use :func:`load_task` (registered task -> ``{split: [Example]}``),
:func:`write_split` and :func:`read_split` (Alpaca JSON files). ``python -m hm_utils.data
list`` prints every registered task with its split sizes under the default caps.
"""

from hm_utils.data.formats import FORMATS, HubOfflineError, LoadReport, load_file, load_source
from hm_utils.data.schema import (
    DataFormatError,
    Example,
    InvalidRecord,
    Language,
    TaskType,
    from_alpaca,
    question_key,
    read_split,
    to_alpaca,
    validate_example,
    write_split,
)
from hm_utils.data.splits import DEFAULT_CAPS, DEFAULT_FRACTIONS, SPLITS, EmptySplitError, make_splits
from hm_utils.data.tasks import (
    TASKS,
    PreparedTask,
    TaskSpec,
    get_task,
    load_task,
    prepare_task,
    register_public_task,
    register_task,
)

__all__ = [
    "DEFAULT_CAPS",
    "DEFAULT_FRACTIONS",
    "FORMATS",
    "SPLITS",
    "TASKS",
    "DataFormatError",
    "EmptySplitError",
    "Example",
    "HubOfflineError",
    "InvalidRecord",
    "Language",
    "LoadReport",
    "PreparedTask",
    "TaskSpec",
    "TaskType",
    "from_alpaca",
    "get_task",
    "load_file",
    "load_source",
    "load_task",
    "make_splits",
    "prepare_task",
    "question_key",
    "read_split",
    "register_public_task",
    "register_task",
    "to_alpaca",
    "validate_example",
    "write_split",
]
