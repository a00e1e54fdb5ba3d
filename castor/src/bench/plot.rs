//! The charts of `castor bench --plots`.

use super::{BenchError, CollectRow, PhaseRow};

/// Draws the legend and writes the PNG.
fn finish_chart<'a, DB: plotters::prelude::DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    mut ch: plotters::prelude::ChartContext<'a, DB, CT>,
    root: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), BenchError>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    ch.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(|e| BenchError::Io(e.to_string()))?;
    root.present().map_err(|e| BenchError::Io(e.to_string()))
}

pub(super) fn plot(
    dir: &std::path::Path,
    collect: &[CollectRow],
    phases: &[PhaseRow],
    host: &str,
) -> Result<(), BenchError> {
    use plotters::prelude::*;
    let font =
        ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"].iter().find_map(|p| std::fs::read(p).ok()).ok_or_else(
            || BenchError::Io("no DejaVuSans.ttf for plot labels (apt-get install fonts-dejavu-core)".into()),
        )?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| BenchError::Io("bad font".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| BenchError::Io(e.to_string()))?;
    let ioe = |e: &dyn std::fmt::Display| BenchError::Io(e.to_string());

    // pause vs dirty pages
    let path = dir.join("pause_vs_dirty_pages.png");
    let root = BitMapBackend::new(&path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| ioe(&e))?;
    let ymax =
        phases.iter().map(|r| r.pause_us_p99.max(r.floor_us).max(r.stop_and_copy_pause_us_p99)).fold(1.0, f64::max)
            * 1.3;
    let xmax = phases.iter().map(|r| r.pages).max().unwrap_or(64) as f64 * 1.5;
    let mut ch = ChartBuilder::on(&root)
        .caption(format!("epoch pause vs dirty pages (ring, 256 MiB; {host})"), ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((40f64..xmax).log_scale(), (10f64..ymax).log_scale())
        .map_err(|e| ioe(&e))?;
    ch.configure_mesh().x_desc("dirty pages per epoch").y_desc("microseconds").draw().map_err(|e| ioe(&e))?;
    type Pick = Box<dyn Fn(&PhaseRow) -> f64>;
    let series: [(&str, RGBColor, Pick); 5] = [
        ("pause p50 (pre-copy)", BLUE, Box::new(|r| r.pause_us_p50)),
        ("pause p99 (pre-copy)", RED, Box::new(|r| r.pause_us_p99)),
        ("stop-and-copy pause p99", MAGENTA, Box::new(|r| r.stop_and_copy_pause_us_p99)),
        ("floor (kick+resume+memcpy)", BLACK, Box::new(|r| r.floor_us)),
        ("state save", GREEN, Box::new(|r| r.save_us)),
    ];
    for (name, color, f) in series {
        ch.draw_series(LineSeries::new(phases.iter().map(|r| (r.pages as f64, f(r))), color.stroke_width(2)))
            .map_err(|e| ioe(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    finish_chart(ch, &root)?;

    // collection cost vs guest size
    let path = dir.join("collect_vs_guest_size.png");
    let root = BitMapBackend::new(&path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| ioe(&e))?;
    let ymax = collect.iter().map(|r| r.collect_us_p50).fold(1.0, f64::max) * 2.0;
    let mut ch = ChartBuilder::on(&root)
        .caption(format!("collect + re-arm cost vs guest size (median; {host})"), ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((200f64..24000f64).log_scale(), (1f64..ymax).log_scale())
        .map_err(|e| ioe(&e))?;
    ch.configure_mesh().x_desc("guest memory (MiB)").y_desc("microseconds").draw().map_err(|e| ioe(&e))?;
    let colors = [BLUE, RED, CYAN, MAGENTA, GREEN, BLACK];
    let mut i = 0;
    for tracker in ["ring", "bitmap"] {
        let mut counts: Vec<u64> = collect.iter().map(|r| r.pages).collect();
        counts.sort_unstable();
        counts.dedup();
        for n in counts {
            let pts: Vec<(f64, f64)> = collect
                .iter()
                .filter(|r| r.tracker == tracker && r.pages == n)
                .map(|r| (r.mem_mib as f64, r.collect_us_p50))
                .collect();
            let color = colors[i % colors.len()];
            i += 1;
            ch.draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| ioe(&e))?
                .label(format!("{tracker}, {n} pages"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    finish_chart(ch, &root)?;
    Ok(())
}
