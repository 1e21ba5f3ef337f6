-- When a renewal replaced the certificate (the one the renewal was authenticated with): an
-- expired certificate renews within the grace only if no renewal replaced it.
ALTER TABLE certificates ADD COLUMN replaced_at BIGINT;
