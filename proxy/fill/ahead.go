package fill

// Lazy pullers (SOCI, stargz) read a blob by ranges, and the first ones they read are
// far from its start: a table of contents at its end, then the files a container opens
// first. Waiting for the fill's in-order ranges to get there would cost them the whole
// blob's time. A reader waiting for bytes that no range being fetched will bring has
// their range fetched at once, on top of the fill's workers (at most as many ranges
// ahead at a time as there are workers): it starts at the byte the reader waits for,
// and runs for a range's size or up to the next bytes spooled or being fetched. The
// workers' in-order ranges then go around it.
//
// Such a reader is usually a bounded range (NewRangeReader), served before the whole
// blob is verified; the fill still verifies the whole blob, and stores nothing corrupt.

// wantAhead has the range from off fetched at once when no running fetch will bring
// byte off; f.mu must be held.
func (f *Fill) wantAhead(off int64) {
	p := f.par
	if p == nil || p.closed || p.err != nil || p.noRanges || off >= p.size || p.ahead >= p.workers {
		return
	}
	c := p.covered()
	if c.end(off) > off {
		return // spooled, or a running fetch will bring it
	}
	t := &task{lo: off, next: off, hi: c.next(off, min(off+p.rangeSize, p.size))}
	p.tasks[t] = struct{}{}
	p.ahead++
	p.wg.Add(1)
	go f.fetchAhead(p, t)
}

// fetchAhead fetches a range a reader waits for.
func (f *Fill) fetchAhead(p *parallel, t *task) {
	defer p.wg.Done()
	f.m.log.Debug("fetching a range ahead of the fill for a reader", "registry", f.Key.Registry,
		"digest", f.Key.Digest, "from", t.lo, "to", t.hi-1)
	err := f.runTask(p, t, nil, make([]byte, segmentBuf))
	if err != nil {
		f.rangeFailed(p, err)
	}
	f.mu.Lock()
	delete(p.tasks, t)
	p.ahead--
	f.notify()
	f.mu.Unlock()
}
