# vmrig: compile a test script (read from stdin) without running it.
# argv: filename first_line. Prints one JSON line: {"ok": true} or the error.
import json
import sys

filename = sys.argv[1]
first_line = int(sys.argv[2])
text = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
try:
    compile("\n" * (first_line - 1) + text, filename, "exec", dont_inherit=True)
except SyntaxError as e:
    line_text = e.text
    if isinstance(line_text, str):
        line_text = line_text.rstrip("\n")
    print(json.dumps({
        "ok": False,
        "type": type(e).__name__,
        "message": e.msg,
        "line": e.lineno,
        "column": e.offset,
        "text": line_text,
    }))
except (ValueError, TypeError) as e:
    print(json.dumps({"ok": False, "type": type(e).__name__, "message": str(e),
                      "line": None, "column": None, "text": None}))
else:
    print(json.dumps({"ok": True}))
