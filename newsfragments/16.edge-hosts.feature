Edge hosts: once an agent is labelled `edge=true`, only such agents serve published ports (default: every agent).
