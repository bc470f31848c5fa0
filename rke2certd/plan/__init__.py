"""Pure decisions: functions of (what was read, now, policy) that return a plan."""
