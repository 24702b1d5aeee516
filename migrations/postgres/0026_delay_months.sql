-- The diagnostic delay in whole calendar months (`CaseRecord::delay_months`), kept beside
-- the delay in days. Research answers band and take quantiles of it; before, they took
-- days x 12 / 365.25, which put a delay of exactly five calendar years with one leap day
-- in it (1,826 days) at 59 months, in the band below. The versions and research rows
-- stored before are filled in at the next start, from each version's dates
-- (`store::research_index::fill_delay_months`), before research answers are served.
ALTER TABLE case_versions ADD COLUMN delay_months BIGINT;
ALTER TABLE patients ADD COLUMN delay_months BIGINT;
