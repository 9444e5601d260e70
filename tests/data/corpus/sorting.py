"""Three ways to sort a list, written for reading rather than speed."""


def insertion_sort(items):
    """Grow a sorted prefix one element at a time: each new element walks left past every
    larger one. Quadratic in the worst case, but fast on lists that are nearly sorted."""
    result = list(items)
    for i in range(1, len(result)):
        current = result[i]
        j = i - 1
        while j >= 0 and result[j] > current:
            result[j + 1] = result[j]
            j -= 1
        result[j + 1] = current
    return result


def merge_sort(items):
    """Split in half, sort each half, merge the two sorted halves. Always n log n comparisons,
    and stable: equal elements keep their original order."""
    if len(items) <= 1:
        return list(items)
    middle = len(items) // 2
    left, right = merge_sort(items[:middle]), merge_sort(items[middle:])
    merged, i, j = [], 0, 0
    while i < len(left) and j < len(right):
        if right[j] < left[i]:
            merged.append(right[j])
            j += 1
        else:
            merged.append(left[i])
            i += 1
    return merged + left[i:] + right[j:]


def counting_sort(items, largest):
    """For small non-negative integers: count each value, then write the values out in order.
    Linear in the number of items plus the largest value, and no comparisons at all."""
    counts = [0] * (largest + 1)
    for value in items:
        counts[value] += 1
    return [value for value, count in enumerate(counts) for _ in range(count)]


if __name__ == "__main__":
    sample = [5, 3, 8, 1, 9, 2, 7]
    assert insertion_sort(sample) == merge_sort(sample) == counting_sort(sample, 9) == sorted(sample)
    print("all three agree:", merge_sort(sample))
