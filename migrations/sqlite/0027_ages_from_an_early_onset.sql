-- Ages count from the middle of the birth month, or from an onset dated to a day before it
-- in the birth month (the patient was born by then: `domain::birth_midpoint`). Before,
-- they counted from the middle in every case, so born in January 2010 with an onset on 5
-- January 2010, a diagnosis on 10 January 2015 was at 4 years and after 59 months, in
-- the delay band below. The research rows of such versions lose their months here and
-- are filled in again at the next start, ages and delay in days with them
-- (`store::research_index::fill_delay_months`), before research answers are served. The
-- condition takes every onset dated to a day of the birth month; the start recomputes
-- each from its dates (those on or after the middle come out as before).
UPDATE patients SET delay_months = NULL
WHERE delay_months IS NOT NULL
  AND EXISTS (
    SELECT 1 FROM case_versions v
    WHERE v.case_id = patients.case_id AND v.version = patients.version
      AND v.onset_kind = 'date' AND LENGTH(v.onset_date) = 10
      AND SUBSTR(v.onset_date, 1, 7) = v.birth_year_month
  );
