-- A renewal records on the new certificate the serial it renewed from (`renewed_from`), and
-- `seen_at` says when a certificate first authenticated a request here. An expired
-- certificate renews within the grace only while no certificate renewed from it was ever
-- seen (nor any later certificate of its identity): a renewal whose answer was lost, or never
-- written to the holder's disk, may be retried; one whose certificate is in use may not.
-- Certificates issued before this migration count as used.
ALTER TABLE certificates ADD COLUMN renewed_from TEXT;
ALTER TABLE certificates ADD COLUMN seen_at BIGINT;
CREATE INDEX certificates_by_origin ON certificates (org, renewed_from);
UPDATE certificates SET seen_at = issued_at;
