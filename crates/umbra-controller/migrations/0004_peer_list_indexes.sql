-- Device listings page in enrollment order and filter by user (`device list --user`): by
-- index, so a page of a large fleet does not sort or scan every device ever enrolled.
CREATE INDEX devices_by_age ON devices (org, created_at, id);
CREATE INDEX devices_by_user ON devices (org, user_id, created_at, id);
CREATE INDEX connectors_by_age ON connectors (org, created_at, id);
