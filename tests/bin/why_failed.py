"""Prints a short digest of why a test step failed, for the last lines of a CI log.

    python3 tests/bin/why_failed.py LOG [--max-lines N]

CI shows only the tail of its output; a molecule or pytest failure scrolls its cause far above the
recap. This reads a step's log (tests/bin/step keeps one per step under tests/output/logs/), drops
ANSI colours and molecule's box-drawing margins, and prints the last few failures: the Ansible task
that failed with its `msg`, or pytest's short test summary lines. Failures that Ansible marked
`...ignoring` are fault tests doing their job and are skipped.
"""
import argparse
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MARGIN = re.compile(r"^\s*[│┃|]\s?")


def clean(line):
    return MARGIN.sub("", ANSI.sub("", line.rstrip("\n")))


def ansible_failures(lines):
    task = ""
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("TASK [") or line.lstrip().startswith("RUNNING HANDLER ["):
            # Task headers wrap: join until the closing bracket.
            header = line.strip()
            j = i + 1
            while "]" not in header and j < len(lines) and j < i + 4:
                header += " " + lines[j].strip()
                j += 1
            task = header.split("]")[0].split("[", 1)[-1]
        elif re.match(r"\s*(fatal|failed): \[", line):
            block = [line.strip()]
            j = i + 1
            while j < len(lines) and j < i + 40 and lines[j].startswith(("  ", "\t")) and "TASK [" not in lines[j]:
                block.append(lines[j].strip())
                j += 1
            ignored = any("...ignoring" in lines[k] for k in range(j, min(j + 3, len(lines))))
            if not ignored:
                msg = [b for b in block if re.match(r"(msg|stderr|assertion|evaluated_to)\b", b)]
                out.append(f"task [{task}]: {block[0]}" + ("".join(f"\n    {m[:300]}" for m in msg[:3])))
            i = j
            continue
        i += 1
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--max-lines", type=int, default=14)
    args = parser.parse_args()
    try:
        with open(args.log, encoding="utf-8", errors="replace") as handle:
            lines = [clean(line) for line in handle]
    except OSError as exc:
        print(f"why-failed: {exc}")
        return 0
    found = ansible_failures(lines)
    found += [line.strip() for line in lines if re.match(r"(FAILED|ERROR) \S+::|E\s{3}", line.strip())][-6:]
    found += [line.strip() for line in lines if "Ansible return code was" in line][-1:]
    # yamllint ("  44:161  error  ...", under its file's line) and ansible-lint ("path:line" under a rule line).
    for index, line in enumerate(lines):
        if re.match(r"\s+\d+:\d+\s+error\s", line):
            owner = next((lines[k].strip() for k in range(index - 1, -1, -1) if lines[k] and not lines[k].startswith(" ")), "")
            found.append(f"{owner}: {line.strip()}")
        elif (re.match(r"\S+\.ya?ml:\d+", line.strip()) and index
              and re.match(r"[a-z][\w-]*(\[[\w-]+\])?: ", lines[index - 1].strip())):
            found.append(f"{lines[index - 1].strip()} {line.strip()}")
    text = "\n".join(found[-4:]).splitlines() if found else ["(no failing task or test found in the log)"]
    print("\n".join(text[-args.max_lines:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
