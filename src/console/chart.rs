//! The diagnostic-delay chart: grouped bars (one per delay band) per group, drawn on the
//! server as SVG with plotters, so the page needs no script. A suppressed count is drawn
//! as no bar and marked "s": the chart shows exactly what the table publishes.

use plotters::prelude::*;

use crate::aggregate::{DELAY_BANDS, DelayTable};

const COLOURS: [RGBColor; 5] = [
    RGBColor(0x1b, 0x4f, 0x72),
    RGBColor(0x21, 0x8c, 0x74),
    RGBColor(0xb9, 0x77, 0x0e),
    RGBColor(0x94, 0x31, 0x26),
    RGBColor(0x5b, 0x2c, 0x6f),
];

/// The chart of `table` as an SVG document (empty on a drawing failure: the table below
/// it carries the same numbers).
pub fn delay_svg(table: &DelayTable) -> String {
    let mut svg = String::new();
    if draw(table, &mut svg).is_err() {
        return String::new();
    }
    // plotters writes a fixed size; the stylesheet scales it.
    svg
}

fn draw(table: &DelayTable, out: &mut String) -> Result<(), String> {
    let e = |err: &dyn std::fmt::Display| err.to_string();
    let groups: Vec<(String, Vec<Option<u64>>)> = if table.groups.is_empty() {
        vec![("all".to_string(), table.band_totals.clone())]
    } else {
        table
            .groups
            .iter()
            .map(|g| {
                let label = if g.labels.is_empty() {
                    "all".to_string()
                } else {
                    g.labels.join(" / ")
                };
                (label, g.bands.clone())
            })
            .collect()
    };
    let nbands = DELAY_BANDS.len();
    let slot = nbands + 1;
    let max = groups
        .iter()
        .flat_map(|(_, b)| b.iter().flatten())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    let width = (120 + groups.len() * slot * 18).clamp(480, 1400) as u32;
    let root = SVGBackend::with_string(out, (width, 360)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let x_max = (groups.len() * slot) as u32;
    let mut chart = ChartBuilder::on(&root)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .caption("Diagnostic delay: patients per band", ("sans-serif", 18))
        .build_cartesian_2d(0u32..x_max, 0u64..(max + max * 3 / 5 + 2))
        .map_err(|x| e(&x))?;
    let labels: Vec<String> = groups.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|x| {
            let i = (*x as usize) / slot;
            if (*x as usize) % slot == nbands / 2 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("patients")
        .draw()
        .map_err(|x| e(&x))?;
    for (band, colour) in COLOURS.iter().enumerate().take(nbands) {
        let bars: Vec<Rectangle<(u32, u64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(g, (_, counts))| {
                let n = counts.get(band).copied().flatten()?;
                let x = (g * slot + band) as u32;
                Some(Rectangle::new([(x, 0), (x + 1, n)], colour.filled()))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|x| e(&x))?
            .label(DELAY_BANDS[band].0)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
        let marks: Vec<_> = groups
            .iter()
            .enumerate()
            .filter(|(_, (_, counts))| counts.get(band).copied().flatten().is_none())
            .map(|(g, _)| {
                Text::new(
                    "s",
                    ((g * slot + band) as u32, max / 20 + 1),
                    ("sans-serif", 14),
                )
            })
            .collect();
        chart.draw_series(marks).map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{DelayGroup, Quantiles};

    fn table() -> DelayTable {
        let q = Quantiles {
            p25: 0.5,
            median: 1.0,
            p75: 2.0,
            p90: 4.0,
        };
        DelayTable {
            groups: vec![
                DelayGroup {
                    labels: vec!["female".into()],
                    bands: vec![Some(12), Some(7), None, None, Some(0)],
                    total: Some(22),
                    quantiles: None,
                },
                DelayGroup {
                    labels: vec!["male".into()],
                    bands: vec![Some(9), Some(11), Some(6), Some(5), Some(0)],
                    total: Some(31),
                    quantiles: Some(q),
                },
            ],
            band_totals: vec![Some(21), Some(18), None, None, Some(0)],
            grand_total: Some(53),
            overall: None,
            suppressed: 4,
        }
    }

    #[test]
    fn the_chart_is_svg_with_the_groups_and_no_inline_style() {
        let svg = delay_svg(&table());
        if let Ok(path) = std::env::var("ERN_CHART_OUT") {
            std::fs::write(path, &svg).unwrap();
        }
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("female") && svg.contains("male"));
        assert!(svg.contains("1-5y"), "the legend names the bands");
        // The page's Content-Security-Policy allows no inline style.
        assert!(!svg.contains("style="), "{svg}");
        assert!(!svg.contains("<script"));
    }
}
