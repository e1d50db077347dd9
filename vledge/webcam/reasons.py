"""Kept apart so the capture thread, which can end a run itself, and the demo loop share one vocabulary."""

# Why a run ended. The first five are normal ends; the others mean the source failed.
END_OF_STREAM = "end_of_stream"
MAX_FRAMES = "max_frames"
TIME_LIMIT = "time_limit"
USER_QUIT = "user_quit"
INTERRUPTED = "interrupted"
READ_ERROR = "read_error"
STALE_SOURCE = "stale_source"
NORMAL_ENDS = (END_OF_STREAM, MAX_FRAMES, TIME_LIMIT, USER_QUIT, INTERRUPTED)
