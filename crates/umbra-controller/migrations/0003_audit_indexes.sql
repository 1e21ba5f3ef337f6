-- The audit log's filters (actor, action, target) and its retention (by age) each find their
-- rows by index: on a year of records, a scan per query, or per second of `audit --follow`,
-- would not keep up.
CREATE INDEX audit_by_actor ON audit (org, actor, seq);
CREATE INDEX audit_by_action ON audit (org, action, seq);
CREATE INDEX audit_by_target ON audit (org, target, seq);
CREATE INDEX audit_by_age ON audit (org, at_ms);
