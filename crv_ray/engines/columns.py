"""Column names shared by every engine transform (the contract between the refine glue and the engines).

In: the working-row columns plus MESSAGES (chat messages as JSON text), SKIP (no call needed) and SEED (optional
per-row sampling seed). Out: the same working-row columns plus the reply columns below.
"""

import pyarrow as pa

MESSAGES = "__messages"
SKIP = "__skip"
SEED = "__seed"
OUT_REPLY = "__reply"
OUT_TOKENS = "__completion_tokens"
OUT_PROMPT_TOKENS = "__prompt_tokens"
OUT_ERROR = "__reply_error"
REPLY_COLUMNS = (OUT_REPLY, OUT_TOKENS, OUT_PROMPT_TOKENS, OUT_ERROR)


def request_schema(state: pa.Schema) -> pa.Schema:
    """What an engine transform reads: the working-row columns plus the request columns, with fixed types."""
    return pa.schema(list(state) + [pa.field(MESSAGES, pa.string()), pa.field(SKIP, pa.bool_()),
                                    pa.field(SEED, pa.int64())])
