package main

import (
	"fmt"
	"image"
	"image/color"
	"image/png"
	"math"
	"os"
	"sort"
	"strings"
)

// writePlot draws add latency (median, log y) against the number of existing
// unrelated backends, both peers, file and phy, from this run's rows.
func writePlot(path string, r *report) error {
	type series struct {
		label string
		col   color.RGBA
		dash  bool
		pts   [][2]float64 // backends, ms
	}
	var ss []*series
	for slot, peer := range slotNames {
		for _, kind := range []string{"file", "phy"} {
			s := &series{label: strings.ToUpper(peer + " " + kind), dash: kind == "file"}
			s.col = []color.RGBA{{200, 40, 40, 255}, {30, 90, 200, 255}, {20, 150, 60, 255}}[slot]
			for _, row := range r.rows {
				if row.op != "add" || row.kind != kind || row.backends < 0 {
					continue
				}
				smp := row.s[slot]
				if len(smp) > 0 {
					s.pts = append(s.pts, [2]float64{float64(row.backends), float64(smp.median()) / 1e6})
				}
			}
			sort.Slice(s.pts, func(i, j int) bool { return s.pts[i][0] < s.pts[j][0] })
			if len(s.pts) > 0 {
				ss = append(ss, s)
			}
		}
	}
	const W, H, L, R, T, B = 900, 560, 90, 30, 50, 70
	img := image.NewRGBA(image.Rect(0, 0, W, H))
	for i := range img.Pix {
		img.Pix[i] = 255
	}
	xmax := 1.0
	ymin, ymax := math.Inf(1), math.Inf(-1)
	for _, s := range ss {
		for _, p := range s.pts {
			xmax = math.Max(xmax, p[0])
			ymin, ymax = math.Min(ymin, p[1]), math.Max(ymax, p[1])
		}
	}
	if len(ss) == 0 {
		ymin, ymax = 1, 10
	}
	lo, hi := math.Floor(math.Log10(ymin)), math.Ceil(math.Log10(ymax))
	if hi <= lo {
		hi = lo + 1
	}
	px := func(x float64) int { return L + int(x/xmax*float64(W-L-R)) }
	py := func(y float64) int { return H - B - int((math.Log10(y)-lo)/(hi-lo)*float64(H-T-B)) }
	grey, black := color.RGBA{220, 220, 220, 255}, color.RGBA{0, 0, 0, 255}
	// grid and y ticks at each decade (and 2, 5)
	for d := lo; d <= hi; d++ {
		for _, m := range []float64{1, 2, 5} {
			y := m * math.Pow(10, d)
			if math.Log10(y) > hi+1e-9 {
				continue
			}
			line(img, L, py(y), W-R, py(y), grey)
			label := trimFloat(y)
			drawText(img, L-8-textWidth(label), py(y)-7, label, black)
		}
	}
	for i := 0; i <= 4; i++ {
		x := xmax * float64(i) / 4
		line(img, px(x), T, px(x), H-B, grey)
		label := trimFloat(math.Round(x))
		drawText(img, px(x)-textWidth(label)/2, H-B+8, label, black)
	}
	line(img, L, H-B, W-R, H-B, black)
	line(img, L, T, L, H-B, black)
	drawText(img, L, 15, "ADD LATENCY, MEDIAN MS (LOG) VS OTHER VBD BACKENDS IN XENSTORE", black)
	drawText(img, W/2-textWidth("EXISTING BACKENDS OF OTHER DOMAINS")/2, H-30, "EXISTING BACKENDS OF OTHER DOMAINS", black)
	for i, s := range ss {
		for j := 1; j < len(s.pts); j++ {
			a, b := s.pts[j-1], s.pts[j]
			thickLine(img, px(a[0]), py(a[1]), px(b[0]), py(b[1]), s.col, s.dash)
		}
		for _, p := range s.pts {
			for dx := -4; dx <= 4; dx++ {
				for dy := -4; dy <= 4; dy++ {
					img.Set(px(p[0])+dx, py(p[1])+dy, s.col)
				}
			}
		}
		ly := T + (H-T-B)*11/20 + 22*i // between the peers: clear of both
		thickLine(img, W-R-340, ly+7, W-R-300, ly+7, s.col, s.dash)
		drawText(img, W-R-290, ly, s.label, black)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func trimFloat(v float64) string {
	s := fmt.Sprintf("%g", v)
	return s
}

func line(img *image.RGBA, x0, y0, x1, y1 int, c color.RGBA) {
	plotLine(img, x0, y0, x1, y1, c, false, 0)
}

func thickLine(img *image.RGBA, x0, y0, x1, y1 int, c color.RGBA, dash bool) {
	for o := -1; o <= 1; o++ {
		plotLine(img, x0, y0+o, x1, y1+o, c, dash, 0)
		plotLine(img, x0+o, y0, x1+o, y1, c, dash, 0)
	}
}

func plotLine(img *image.RGBA, x0, y0, x1, y1 int, c color.RGBA, dash bool, _ int) {
	n := max(abs(x1-x0), abs(y1-y0), 1)
	for i := 0; i <= n; i++ {
		if dash && (i/8)%2 == 1 {
			continue
		}
		img.Set(x0+(x1-x0)*i/n, y0+(y1-y0)*i/n, c)
	}
}

func abs(a int) int {
	if a < 0 {
		return -a
	}
	return a
}

// A 5×7 bitmap font for the few characters the plot needs, drawn at 2×.
var glyphs = map[rune][7]string{
	'0': {".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."},
	'1': {"..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."},
	'2': {".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"},
	'3': {"####.", "....#", "....#", ".###.", "....#", "....#", "####."},
	'4': {"...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."},
	'5': {"#####", "#....", "####.", "....#", "....#", "#...#", ".###."},
	'6': {".###.", "#....", "#....", "####.", "#...#", "#...#", ".###."},
	'7': {"#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."},
	'8': {".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."},
	'9': {".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."},
	'.': {".....", ".....", ".....", ".....", ".....", ".##..", ".##.."},
	',': {".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."},
	'-': {".....", ".....", ".....", "#####", ".....", ".....", "....."},
	'(': {"...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."},
	')': {".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."},
	'e': {".....", ".....", ".###.", "#...#", "#####", "#....", ".###."},
	'+': {".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."},
	'A': {".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"},
	'B': {"####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."},
	'C': {".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."},
	'D': {"####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."},
	'E': {"#####", "#....", "#....", "####.", "#....", "#....", "#####"},
	'F': {"#####", "#....", "#....", "####.", "#....", "#....", "#...."},
	'G': {".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".###."},
	'H': {"#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"},
	'I': {".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."},
	'K': {"#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"},
	'L': {"#....", "#....", "#....", "#....", "#....", "#....", "#####"},
	'M': {"#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"},
	'N': {"#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"},
	'O': {".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."},
	'P': {"####.", "#...#", "#...#", "####.", "#....", "#....", "#...."},
	'R': {"####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"},
	'S': {".####", "#....", "#....", ".###.", "....#", "....#", "####."},
	'T': {"#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."},
	'U': {"#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."},
	'V': {"#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."},
	'W': {"#...#", "#...#", "#...#", "#.#.#", "#.#.#", "##.##", "#...#"},
	'X': {"#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"},
	'Y': {"#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."},
	'Z': {"#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"},
}

func textWidth(s string) int { return len([]rune(s)) * 12 }

func drawText(img *image.RGBA, x, y int, s string, c color.RGBA) {
	for _, r := range s {
		if g, ok := glyphs[r]; ok {
			for gy, rowStr := range g {
				for gx, ch := range rowStr {
					if ch == '#' {
						for d := 0; d < 4; d++ {
							img.Set(x+2*gx+d%2, y+2*gy+d/2, c)
						}
					}
				}
			}
		}
		x += 12
	}
}
